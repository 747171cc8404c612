"""``bpo rewrite``: one prompt through an optimizer, printed, for trying a model or a backend."""

from __future__ import annotations

import argparse
import asyncio
import sys

from optimizer.base import MODES, Mode, OptimizerError, OptimizerOptions, Rewrite, wait_until_settled

# Flags of `bpo rewrite` that are also `bpo serve` settings: same names, same BPO_* variables.
SHARED_SETTINGS = ("optimizer", "optimizer_seed", "optimizer_max_new_tokens", "optimizer_device",
                   "optimizer_model", "optimizer_api_key", "mode")


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "rewrite", help="print the optimized prompt for TEXT",
        description="Rewrite one prompt with an optimizer and print the result. --optimizer, --mode and "
                    "the decoding flags also read BPO_OPTIMIZER, BPO_MODE, BPO_OPTIMIZER_SEED, ...")
    parser.add_argument("text", nargs="?", default="-", metavar="TEXT",
                        help="the prompt to optimize ('-' or nothing: read standard input)")
    parser.add_argument("--optimizer", metavar="SPEC", help="none | hf:PATH_OR_HUB_ID | remote:BASE_URL | llm:MODEL "
                                            "[default: hf:THUDM/BPO]")
    parser.add_argument("--mode", choices=MODES, help="stable (default) or aggressive decoding")
    parser.add_argument("--seed", dest="optimizer_seed", type=int, metavar="N",
                        help="seed for a reproducible rewrite")
    parser.add_argument("--max-new-tokens", dest="optimizer_max_new_tokens", type=int, metavar="N",
                        help="cap on a rewrite's tokens; each rewrite's budget is 6x its prompt (at least 128) "
                             "up to this [default: 1024]")
    parser.add_argument("--device", dest="optimizer_device", metavar="DEVICE",
                        help="torch device for hf: (default: cuda, mps, cpu)")
    parser.add_argument("--model", dest="optimizer_model", metavar="NAME", help="model name on a remote: server")
    parser.add_argument("--api-key", dest="optimizer_api_key", metavar="KEY",
                        help="API key for a remote: or llm: optimizer")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="seconds to wait for loading plus the rewrite [default: 600]")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print the optimizer's name@version and the fidelity guard's verdict (stderr)")
    parser.set_defaults(handler=run_rewrite)


def run_rewrite(args: argparse.Namespace) -> int:
    from proxy.settings import SettingsError, load_settings

    try:
        settings = load_settings({name: getattr(args, name) for name in SHARED_SETTINGS})
    except SettingsError as exc:
        print(f"bpo rewrite: {exc}", file=sys.stderr)
        return 2
    # `echo TEXT | bpo rewrite` adds a line break the user never typed; it changed the model's rewrite.
    text = sys.stdin.read().rstrip("\r\n") if args.text == "-" else args.text
    if not text.strip():
        print("bpo rewrite: nothing to rewrite (TEXT is empty)", file=sys.stderr)
        return 2
    options = OptimizerOptions(
        max_new_tokens=settings.optimizer_max_new_tokens, max_batch_size=1, max_wait_ms=0.0,
        seed=settings.optimizer_seed, device=settings.optimizer_device, remote_model=settings.optimizer_model,
        request_timeout=args.timeout, api_key=settings.optimizer_api_key, retry_unreachable=False)
    mode: Mode = "aggressive" if settings.mode == "aggressive" else "stable"
    try:
        rewrite = asyncio.run(asyncio.wait_for(rewrite_once(settings.optimizer, options, text, mode), args.timeout))
    except TimeoutError:
        print(f"bpo rewrite: no rewrite within {args.timeout:g} s", file=sys.stderr)
        return 1
    except OptimizerError as exc:
        print(f"bpo rewrite: {exc}", file=sys.stderr)
        return 1
    print(rewrite.text)
    if args.verbose:
        _explain(text, rewrite)
    return 0


async def rewrite_once(spec: str, options: OptimizerOptions, text: str, mode: Mode) -> Rewrite:
    """Build, load and run the optimizer for one prompt; raise OptimizerError saying why it could not."""
    from optimizer.registry import build_optimizer

    optimizer = build_optimizer(spec, options)
    try:
        await optimizer.start()
        status = await wait_until_settled(optimizer)
        if status.state == "disabled":
            raise OptimizerError("--optimizer none rewrites nothing: name an optimizer (--optimizer SPEC)")
        if status.state != "ready":
            raise OptimizerError(f"the optimizer {spec} is not available: {status.detail}")
        return await optimizer.optimize(text, mode)
    finally:
        await optimizer.close()


def _explain(original: str, rewrite: Rewrite) -> None:
    from optimizer.guard import check_rewrite

    verdict = check_rewrite(original, rewrite.text)
    guard = "accepted" if verdict.accepted else f"rejected by {verdict.rule}: {verdict.detail}"
    print(f"optimizer: {rewrite.optimizer}\nguard: {guard}", file=sys.stderr)
