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

SUBCOMMANDS = {  # name -> (module, help); a module with COMMANDS serves several names
    "demo": ("xtuner_vitask.cli.demo", "run the whole method end to end on a generated set (CPU, offline) and print one table"),
    "eval": ("xtuner_vitask.cli.eval", "accuracy, macro-F1, per-class P/R/F1 and a confusion matrix of an exported model"),
    "chat": ("xtuner_vitask.cli.chat", "chat about an image with an exported model (like `xtuner chat`)"),
    "plug": ("xtuner_vitask.cli.plug", "VITask^plug: swap a newly trained TSM into an EP export, no VLM training"),
    "ranking-plot": ("xtuner_vitask.cli.ranking_plot",
                     "density of response probabilities for positive vs negative images (paper Fig. 4)"),
    "convert-medmnist": ("xtuner_vitask.cli.convert", "MedMNIST 2D npz -> images + XTuner InternVL JSONL + meta.json"),
    "convert-external": ("xtuner_vitask.cli.convert", "image folder + CSV (image,label) -> the same format"),
    "merge-sets": ("xtuner_vitask.cli.convert", "merge converted sets into one set with a joint label space"),
    "cache-exemplars": ("xtuner_vitask.cli.cache_exemplars",
                        "compute every image's TSM exemplar once (cls or all tokens), keyed by record id"),
    "make-tiny": ("xtuner_vitask.cli.make_tiny",
                  "write a tiny InternVL2-compatible checkpoint (random weights) for offline tests"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="xtuner-vitask", description="VITask for XTuner's InternVL2 recipes")
    parser.add_argument("--version", action="version", version=f"xtuner-vitask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help/version/errors and exits
        parser.print_help()
        return 2
    name = argv[0]
    module_name, text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    add_arguments, run = (module.COMMANDS[name][:2] if name in getattr(module, "COMMANDS", {})
                          else (module.add_arguments, module.run))
    sub = argparse.ArgumentParser(prog=f"xtuner-vitask {name}", description=text)
    add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(run(args) or 0)
    except VITaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
