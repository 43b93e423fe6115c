"""The `imagine` command: generate, train, eval, bench, serve.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`; this file
only wires them, importing a module when its command runs (so `imagine --help` stays fast).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys

# No hub call, ever: every model loads from a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMANDS = {
    "generate": ("imagine.commands.generate", "generate images from a prompt (the embedded default model if no --model)"),
    "upscale": ("imagine.commands.upscale", "enlarge pictures with an upscaler model (ESRGAN, Real-ESRGAN)"),
    "train": ("imagine.train.cli", "train a VAE or a text-conditioned diffusion model"),
    "serve": ("imagine.server.cli", "serve the AUTOMATIC1111- and OpenAI-style HTTP API and the web page"),
}
EVALS = {
    "shapes": ("imagine.evaluation", "score a model on the shapes task with the exact judge"),
    "captions": ("imagine.caption_probe", "which caption words a model uses, per noise level (denoising error)"),
    "upscaler": ("imagine.upscaler_eval", "score an upscaler on held-out shapes scenes against bicubic and Lanczos"),
}
BENCHES = {
    "samplers": ("imagine.bench.samplers", "our samplers vs diffusers' schedulers on exact Gaussian-mixture models"),
    "speed": ("imagine.bench.speed", "U-Net step and VAE decode time vs diffusers on identical weights"),
    "imagen": ("imagine.bench.imagen", "Imagen's U-Net step vs imagen-pytorch's Unet on identical weights"),
    "upscale": ("imagine.bench.upscale", "upscaler models (ESRGAN, Real-ESRGAN) vs spandrel on identical weights"),
    "train": ("imagine.bench.train", "training throughput vs a plain diffusers U-Net training step"),
    "serve": ("imagine.bench.serve", "load test of `imagine serve` on loopback"),
    "default": ("imagine.bench.default", "cold start to saved image with the embedded default model"),
}


def did_you_mean(word: str, candidates, key=None, n: int = 3) -> str:
    """" (did you mean 'x'?)" for the candidates closest to `word` (difflib's ratio, 0.6 and up; `key` makes each name
    its comparable form, e.g. lower case without spaces), or "" where none is close."""
    key = key or (lambda s: str(s).lower())
    forms: dict[str, str] = {}
    for c in candidates:
        forms.setdefault(key(c), str(c))
    close = difflib.get_close_matches(key(word), list(forms), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(forms[c]) for c in close) + "?)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (not the whole synopsis, 40 lines for generate), with the
    near misses of a mistyped option or choice, and where --help is: exit code 2, as argparse."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            tokens = message[len("unrecognized arguments: "):].split()
            options = [o for o in self._option_string_actions if o.startswith("--")]
            hints = [(f, hint) for f in dict.fromkeys(t.split("=", 1)[0] for t in tokens if t.startswith("-"))
                     if (hint := did_you_mean(f, options, n=1))]
            if len(hints) == 1:
                message += hints[0][1]
            elif hints:
                message += " (" + "; ".join(f"{f}: {h.strip(' ()')}" for f, h in hints) + ")"
            elif any(not t.startswith("-") for t in tokens) and any(a.dest == "prompt" for a in self._actions):
                message += " (a prompt of several words goes in quotes: \"a red circle\")"
        m = re.search(r"invalid choice: (.+?) \(choose from (.*)\)$", message)
        if m:
            choices = re.findall(r"'((?:[^'\\]|\\.)*)'", m.group(2))
            hint = did_you_mean(m.group(1).strip("'\""), choices)
            message = f"{message[:m.start()]}invalid choice: {m.group(1)}{hint}; choose from {m.group(2)}"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


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

    p = _Parser(prog="imagine", description="Text-to-image diffusion, offline on a CPU.")
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
    sp = _Parser(prog=prog, description=module.__doc__.strip().splitlines()[0] if module.__doc__ else None)
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
        print(f"imagine: error: {_in_flags(_message(e), sp, sub_args) if not isinstance(e, OSError) else _message(e)}",
              file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # out of memory (torch's CPU allocator raises a RuntimeError): one line, exit 1 (not a usage error); any other
        # RuntimeError is a fault, with its traceback
        if args.verbose or not (isinstance(e, MemoryError) or _out_of_memory(e)):
            raise
        hint = " (a smaller --height/--width or --batch-size takes less)" if args.command == "generate" else ""
        print(f"imagine: error: out of memory: {_message(e)}{hint}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("can't allocate memory", "not enough memory", "out of memory"))


def _message(e: BaseException) -> str:
    """The error as one line; the system's OSErrors ("[Errno 21] Is a directory: 'x'") as "x: Is a directory"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _in_flags(message: str, parser: argparse.ArgumentParser, args) -> str:
    """A library error that starts with its parameter's name ("hires_scale must be ...", "height 63 is not ...") as the
    flag the user gave for it ("--hires-scale must be ..."); left as it is where that flag was not given (the value
    is then the model's or the pipeline's own, and the name may be another pass's)."""
    m = re.match(r"([a-z][a-z0-9_]*)(?=[ :])", message)
    if not m:
        return message
    for action in parser._actions:
        if action.dest == m.group(1) and action.option_strings and \
                getattr(args, action.dest, action.default) not in (action.default, None):
            flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
            return flag + message[m.end():]
    return message


if __name__ == "__main__":
    sys.exit(main())
