"""`fasteer` command line: demo | info | extract | generate | sweep | bench | eval.

Each command lives in its own module under `fasteer.commands` and is imported only when
run, so `fasteer info` stays fast and never touches CUDA unless asked to report it.
Bad input ends with one clear line on stderr and exit code 2, no traceback, and is
found before the heavy imports (transformers) and before any model loads. `--help` of
every command shows each option's default. Progress bars go to stderr when it is a
terminal (`--quiet` or FASTEER_PROGRESS=0 turns them off, FASTEER_PROGRESS=1 on).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("fasteer.commands.demo", "steer the embedded demo model (or --model) and show the effect"),
    "info": ("fasteer.commands.info", "version, torch, and which backends are available and why not"),
    "extract": ("fasteer.commands.extract", "extract a steering vector from prompt files"),
    "generate": ("fasteer.commands.generate", "generate with steering: vectors from `extract` "
                 "(--add, --clamp, --ablate) and SAE feature edits (--feature)"),
    "sweep": ("fasteer.commands.sweep", "alpha sweep as one batched generate, table + PNG"),
    "bench": ("fasteer.commands.bench", "run the CPU benchmark set"),
    "eval": ("fasteer.commands.eval", "concept score, fluency and their combination per "
             "steering strength, with intervals"),
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and appends "(default: X)" to every option whose
    default means something (not None, False, [] or suppressed) unless its help already
    says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings or action.nargs in ("?", "*")) and "%(default)" not in text \
                and default is not None and default is not False and default != [] \
                and default is not argparse.SUPPRESS and "default:" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fasteer", description=__doc__.splitlines()[0],
                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # a command not built yet is simply not offered
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=getattr(mod, "EPILOG", None), formatter_class=_Formatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "device"):  # a command that runs a model: check before any work
            from .commands._common import preflight
            preflight(args.device)
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"fasteer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
