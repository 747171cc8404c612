"""The ``bpo data build|iterate``, ``bpo train`` and ``bpo eval`` subcommands, built from the stages'
dataclass configs so every flag carries the help text of its field."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from training.build import BuildConfig
from training.errors import TrainingError
from training.evaluate import EvalConfig
from training.iterate import IterateConfig
from training.sft import TrainConfig

# (command path, help, config class, module whose main(config) runs it)
STAGES: tuple[tuple[tuple[str, ...], str, type[Any], str], ...] = (
    (("data", "build"), "build (prompt, optimized prompt) pairs from preference records with an LLM critic",
     BuildConfig, "training.build"),
    (("data", "iterate"), "optimize prompts again and again (iterative BPO), writing every round",
     IterateConfig, "training.iterate"),
    (("train",), "fine-tune an optimizer model on pairs; the output loads with --optimizer hf:DIR",
     TrainConfig, "training.sft"),
    (("eval",), "pairwise-judge evaluation of an optimizer: win/tie/loss and ΔWR per prompt set",
     EvalConfig, "training.evaluate"),
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``data`` (``build``, ``iterate``), ``train`` and ``eval`` to the ``bpo`` parser."""
    data = subparsers.add_parser("data", help="build training data for the optimizer",
                                 description="Build training data for the optimizer.")
    data_commands = data.add_subparsers(dest="data_command", metavar="{build,iterate}", required=True)
    for path, summary, config_class, module in STAGES:
        parent = data_commands if path[0] == "data" else subparsers
        parser = parent.add_parser(path[-1], help=summary, description=summary[0].upper() + summary[1:] + ".")
        add_config_arguments(parser, config_class)
        parser.set_defaults(handler=functools.partial(run_stage, config_class=config_class, module=module,
                                                      command=" ".join(path)))


def _flag_type(hint: Any) -> tuple[Any, bool]:
    """The argparse ``type`` for a field annotation, and whether it is a list (a repeatable flag)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _flag_type(args[0])
    if origin is list:
        return args[0], True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[Any]) -> None:
    """One flag per field of a stage's config dataclass, with its real default, type and help.

    Not shared with ``proxy.settings.add_arguments``: the gateway's flags default to unset (env and YAML
    fill them, then one coercion names the source of a bad value), while a stage's flags carry argparse
    types, required and repeated flags. Only the flag spelling and the bool rule are common.
    """
    hints = typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        flag = "--" + item.name.replace("_", "-")
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        default = None if required else (
            item.default if item.default is not dataclasses.MISSING else item.default_factory())  # type: ignore[misc,operator]
        options: dict[str, Any] = {"dest": item.name, "help": item.metadata.get("help", ""), "default": default}
        kind, repeated = _flag_type(hints[item.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if item.metadata.get("required", required):
            options["required"] = True
        if "choices" in item.metadata:
            options["choices"] = item.metadata["choices"]
        if repeated:
            options.update(action="extend", nargs="+", default=None)
        parser.add_argument(flag, type=kind, metavar=item.metadata.get("metavar"), **options)


def config_from_args(args: argparse.Namespace, config_class: type[Any]) -> Any:
    values = {}
    for item in dataclasses.fields(config_class):
        value = getattr(args, item.name)
        if value is None and item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
        values[item.name] = value
    return config_class(**values)


def run_stage(args: argparse.Namespace, config_class: type[Any], module: str, command: str) -> int:
    """Build the stage's config from the parsed flags and run its ``main``; user errors become one line.

    The one boundary where errors a user can fix (ours, ``TrainingError``; the system's, ``OSError``: a
    missing file, an unreadable model dir, a full disk) turn into ``bpo <command>: <message>`` and exit
    status 2. Anything else is a bug and keeps its traceback.
    """
    config = config_from_args(args, config_class)
    try:
        importlib.import_module(module).main(config)
    except (TrainingError, OSError) as exc:
        print(f"bpo {command}: {describe_error(exc)}", file=sys.stderr)
        return 2
    return 0


def describe_error(exc: Exception) -> str:
    """One line for the user: an OSError names its file first, like the shell does."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpo", description="bpo-proxy training tools")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a training subcommand without the proxy's entry point: ``python -m training.cli train ...``."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
