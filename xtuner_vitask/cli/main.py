"""The ``xtuner-vitask`` console script: one subcommand per module in this package.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``
(its docstring's first line is the help text). Modules are imported only when
their subcommand runs, so ``xtuner-vitask --help`` stays fast.

Every command (and the ``data_tools/`` scripts, through :func:`run_command`):
- prints a :class:`VITaskError` as one ``error: ...`` line and exits 2; Ctrl-C and SIGTERM
  exit 130/143 after the command's own clean-up (converters remove their partial output);
- runs torch with :func:`default_threads` CPU threads unless ``OMP_NUM_THREADS`` is set
  (on shared CPUs, one thread per core oversubscribes: a VITask step took ~13 s instead of 0.3 s);
- keeps third-party start-up banners (bitsandbytes, DeepSpeed) quiet unless ``--verbose``.
"""
import argparse
import importlib
import logging
import os
import signal
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
    "list-cfg": ("xtuner_vitask.cli.cfg", "list the configs shipped with xtuner-vitask (like `xtuner list-cfg`)"),
    "copy-cfg": ("xtuner_vitask.cli.cfg", "copy a shipped config (and the base files it reads) to a folder to edit"),
    "make-tiny": ("xtuner_vitask.cli.make_tiny",
                  "write a tiny InternVL2-compatible checkpoint (random weights) for offline tests"),
}
# Commands that never import torch: no thread line for them.
NO_TORCH = {"convert-medmnist", "convert-external", "merge-sets", "list-cfg", "copy-cfg"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that ``finally``/``except BaseException`` clean-ups run."""


def _raise_terminated(signum, frame):
    raise Terminated()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads() -> int:
    """Half the CPUs this process may use, 1 to 8: leaves room for data workers and other users."""
    return max(1, min(8, available_cpus() // 2))


def set_thread_default(announce: bool = True) -> int | None:
    """Set the CPU thread variables (inherited by training subprocesses) when the user has not; returns
    the count set, or None when ``OMP_NUM_THREADS`` was given."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = default_threads()
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if announce:
        print(f"xtuner-vitask: {threads} CPU thread(s) per process ({available_cpus()} CPUs available; "
              "set OMP_NUM_THREADS to choose)", file=sys.stderr)
    return threads


class _ErrorsOnly(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.ERROR


def quiet_banners() -> None:
    """Third-party start-up notices off in this process: DeepSpeed's accelerator lines ("Setting
    ds_accelerator to cpu", INFO and WARNING; DeepSpeed resets its logger's level when imported, a
    filter stays) and bitsandbytes' "compiled without GPU support" (a warning of its own logger)."""
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in deepspeed.filters):
        deepspeed.addFilter(_ErrorsOnly())
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def run_command(run, args, verbose: bool = False) -> int:
    """Run ``run(args)``: VITaskError -> one ``error:`` line and 2; Ctrl-C -> 130; SIGTERM -> 143."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(run(args) or 0)
    except VITaskError as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM); partial output was removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; partial output was removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    sub = argparse.ArgumentParser(
        prog=f"xtuner-vitask {name}", description=text,
        epilog=None if name in NO_TORCH else f"CPU threads: {default_threads()} per process unless OMP_NUM_THREADS "
                                              "is set (half the available CPUs, at most 8).")
    add_arguments(sub)
    sub.add_argument("--verbose", action="store_true",
                     help="show third-party start-up messages, the model loading log and full tracebacks")
    args = sub.parse_args(argv[1:])
    if name not in NO_TORCH:
        set_thread_default()
    if not args.verbose:
        quiet_banners()
    return run_command(run, args, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
