"""The `imagine` command: generate, train, eval, bench, serve.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`; this file
only wires them, importing a module when its command runs (so `imagine --help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# No hub call, ever: every model loads from a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMANDS = {
    "generate": ("imagine.commands.generate", "generate images from a prompt (the embedded default model if no --model)"),
    "train": ("imagine.train.cli", "train a VAE or a text-conditioned diffusion model"),
    "serve": ("imagine.server.cli", "serve the AUTOMATIC1111- and OpenAI-style HTTP API and the web page"),
}
EVALS = {
    "shapes": ("imagine.evaluation", "score a model on the shapes task with the exact judge"),
    "captions": ("imagine.caption_probe", "which caption words a model uses, per noise level (denoising error)"),
}
BENCHES = {
    "samplers": ("imagine.bench.samplers", "our samplers vs diffusers' schedulers on exact Gaussian-mixture models"),
    "speed": ("imagine.bench.speed", "U-Net step and VAE decode time vs diffusers on identical weights"),
    "train": ("imagine.bench.train", "training throughput vs a plain diffusers U-Net training step"),
    "serve": ("imagine.bench.serve", "load test of `imagine serve` on loopback"),
    "default": ("imagine.bench.default", "cold start to saved image with the embedded default model"),
}


def _add_group(sub, name: str, help_: str, table: dict) -> None:
    p = sub.add_parser(name, help=help_)
    inner = p.add_subparsers(dest="target", metavar="WHAT", required=True)
    for key, (mod, h) in table.items():
        q = inner.add_parser(key, help=h, add_help=False)
        _lazy_arguments(q, mod)


def _lazy_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    # Arguments are only needed for the command that runs: the module's own parser reads what
    # this one leaves over (parse_known_args), so the import waits until then.
    parser.set_defaults(_module=module)


def build_parser() -> argparse.ArgumentParser:
    from imagine import __version__

    p = argparse.ArgumentParser(prog="imagine", description="Text-to-image diffusion, offline on a CPU.")
    p.add_argument("--version", action="version", version=f"imagine {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (mod, h) in COMMANDS.items():
        q = sub.add_parser(name, help=h, add_help=False)
        _lazy_arguments(q, mod)
    _add_group(sub, "eval", "evaluate a model", EVALS)
    _add_group(sub, "bench", "run a benchmark against the peers", BENCHES)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = build_parser()
    args, rest = top.parse_known_args(argv)
    module = importlib.import_module(args._module)
    prog = "imagine " + " ".join(x for x in (args.command, getattr(args, "target", None)) if x)
    sp = argparse.ArgumentParser(prog=prog, description=module.__doc__.strip().splitlines()[0] if module.__doc__ else None)
    module.add_arguments(sp)
    # (-v after the command too: `imagine generate -v ...`)
    sp.add_argument("-v", "--verbose", action="store_true", default=args.verbose, help="log more")
    sub_args = sp.parse_args(rest)
    args.verbose = sub_args.verbose
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        # a command may take its flags' defaults from a file (generate --infotext): the flags are read again over
        # them, so those given win
        extra = module.defaults_from(sub_args) if hasattr(module, "defaults_from") else None
        if extra:
            sp.set_defaults(**extra)
            sub_args = sp.parse_args(rest)
        result = module.run(sub_args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ModuleNotFoundError) as e:
        # OSError: a path that cannot be read or written (a folder where a file goes, no permission, a full
        # disk), FileNotFoundError among them; -v shows the traceback
        if args.verbose:
            raise
        print(f"imagine: error: {_message(e)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _message(e: BaseException) -> str:
    """The error as one line; the system's OSErrors ("[Errno 21] Is a directory: 'x'") as "x: Is a directory"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
