"""The ``xtuner-vitask`` console script: one subcommand per module in this package.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``
(its docstring's first line is the help text). Modules are imported only when
their subcommand runs, so ``xtuner-vitask --help`` stays fast.
"""
import argparse
import importlib
import sys

from .. import __version__
from ..errors import VITaskError

SUBCOMMANDS = {
    "make-tiny": "xtuner_vitask.cli.make_tiny",
}

HELP = {
    "make-tiny": "write a tiny InternVL2-compatible checkpoint (random weights) for offline tests",
}


def build_parser():
    parser = argparse.ArgumentParser(prog="xtuner-vitask", description="VITask for XTuner's InternVL2 recipes")
    parser.add_argument("--version", action="version", version=f"xtuner-vitask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        sub.add_parser(name, help=HELP.get(name, ""), add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help/version/errors and exits
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name])
    sub = argparse.ArgumentParser(prog=f"xtuner-vitask {name}", description=HELP.get(name))
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except VITaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
