"""The ``bpo`` command line: ``serve`` here; the other subcommands are registered by their packages (not for
``bpo serve``, so the gateway never loads the training package)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from proxy.settings import SettingsError, add_arguments, load_settings


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``bpo`` parser. For ``command == "serve"`` only serve is registered: the gateway's process then
    never imports the training package (nor litellm, matplotlib, ... that other subcommands may load)."""
    parser = argparse.ArgumentParser(
        prog="bpo", description="bpo-proxy: an OpenAI-compatible gateway that optimizes prompts (BPO).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help="run the proxy",
                                description="Run the proxy. Every flag also reads BPO_<FLAG> from the "
                                            "environment; a flag beats the variable, which beats --config.")
    add_arguments(serve)
    serve.set_defaults(handler=run_serve)
    if command != "serve":
        _register_optional(commands)
    return parser


def _register_optional(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The other subcommands; each imports its heavy dependencies only when it runs."""
    from proxy.report import register as register_report
    from proxy.rewrite_cli import register as register_rewrite
    from training.cli import register as register_training

    register_rewrite(commands)
    register_training(commands)
    register_report(commands)


def run_serve(args: argparse.Namespace) -> int:
    from proxy import server
    from proxy.logs import configure_logging

    try:
        settings = load_settings(vars(args))
    except SettingsError as exc:
        print(f"bpo serve: {exc}", file=sys.stderr)
        return 2
    from proxy.open_relay import open_relay_problem

    problem = open_relay_problem(settings)
    if problem is not None:
        print(f"bpo serve: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.workers == 1:
        from proxy.app import create_app

        server.run(create_app(settings, server_process=True), settings)
        return 0
    # Several workers: each process builds its own app from the same settings, passed as BPO_* variables.
    from proxy.metrics import use_multiprocess_dir
    from proxy.settings import export_environment

    export_environment(settings, os.environ)
    use_multiprocess_dir(os.environ)
    server.run("proxy.app:create_app_from_environment", settings, factory=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        result: int = args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (`bpo ab report --format json | head`): stop quietly, as Unix tools do. Python's
        # own flush at exit would fail again, so stdout is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE
    return result


if __name__ == "__main__":
    sys.exit(main())
