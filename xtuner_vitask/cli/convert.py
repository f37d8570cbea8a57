"""Command-line front ends of the data converters (``xtuner_vitask.data``).

Three commands, each an ``(add_arguments, run, help)`` triple in :data:`COMMANDS`
(``xtuner-vitask convert-medmnist | convert-external | merge-sets``); the scripts in ``data_tools/``
call :func:`script_main`, which runs them the same way (one ``error:`` line and exit 2 on bad
input; Ctrl-C and SIGTERM remove the partial output and exit 130/143 without tracebacks).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager

from xtuner_vitask.cli.main import available_cpus, run_command
from xtuner_vitask.data.medmnist import MEDMNIST_2D_FLAGS


@contextmanager
def warnings_as_lines():
    """Show warnings as one ``warning: ...`` line each (no source line dump)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _plain_warnings(function):
    """Decorator: run a command with :func:`warnings_as_lines`."""
    def wrapper(args):
        with warnings_as_lines():
            return function(args)
    wrapper.__name__, wrapper.__doc__ = function.__name__, function.__doc__
    return wrapper


def _common_output(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (built under a temporary name)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    workers = min(2, available_cpus())
    parser.add_argument("--workers", type=int, default=workers,
                        help=f"PNG writing processes (default {workers}: two, at most the CPUs available; 1 = no "
                             "extra process, kinder to a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_medmnist_arguments(parser) -> None:
    """Options of ``convert-medmnist`` (data_tools/medmnist_to_xtuner.py)."""
    # choices are checked by the converter so that the message lists the valid values in one line
    parser.add_argument("--flag", required=True, help=f"MedMNIST 2D set: {', '.join(MEDMNIST_2D_FLAGS)}")
    parser.add_argument("--size", type=int, default=28, help="image size: 28, 64, 128 or 224 (default 28)")
    parser.add_argument("--root", help="folder with medmnist's npz files (default: medmnist's ~/.medmnist)")
    parser.add_argument("--npz", dest="npz_path", help="the npz file itself (overrides --root and file naming)")
    parser.add_argument("--download", action="store_true", help="let medmnist download the file into --root")
    parser.add_argument("--verify", action="store_true", help="check the file against medmnist.INFO's MD5")
    parser.add_argument("--instruction", dest="instruction_variant", default="complete",
                        choices=("complete", "incomplete"),
                        help="'incomplete' drops the list of possible diagnoses (paper Fig. 5)")
    parser.add_argument("--limit-per-split", type=int, help="keep N images per split (stratified, seeded)")
    parser.add_argument("--fraction", type=float, help="keep this fraction of each split (stratified, seeded)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _common_output(parser)


@_plain_warnings
def run_medmnist(args) -> int:
    from xtuner_vitask.data.convert import convert_medmnist

    out = convert_medmnist(
        args.flag, args.size, args.out, root=args.root, npz_path=args.npz_path, download=args.download,
        verify=args.verify, instruction_variant=args.instruction_variant,
        limit_per_split=args.limit_per_split, fraction=args.fraction, seed=args.seed, force=args.force,
        workers=args.workers, progress=not args.no_progress,
    )
    print(f"wrote {out}")
    return 0


def add_external_arguments(parser) -> None:
    """Options of ``convert-external`` (data_tools/external_to_xtuner.py)."""
    parser.add_argument("--images", required=True, help="folder holding the images")
    parser.add_argument("--csv", required=True, help="CSV with an image column and a label column")
    parser.add_argument("--meta", required=True, help="meta.json (or folder) of the converted set whose labels to use")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to write (default test)")
    parser.add_argument("--name", help="name in the record ids (default: the CSV's file name)")
    parser.add_argument("--image-column", default="image", help="CSV column of image names (default 'image')")
    parser.add_argument("--label-column", default="label", help="CSV column of labels (default 'label')")
    parser.add_argument("--size", type=int, help="resize to this size (default: the meta's; 0 keeps the images' size)")
    parser.add_argument("--instruction", dest="instruction_variant", choices=("complete", "incomplete"),
                        help="instruction variant (default: the meta's)")
    _common_output(parser)


@_plain_warnings
def run_external(args) -> int:
    from xtuner_vitask.data.external import convert_external

    out = convert_external(
        args.images, args.csv, args.meta, args.out, split=args.split, name=args.name,
        image_column=args.image_column, label_column=args.label_column, size=args.size,
        instruction_variant=args.instruction_variant, force=args.force, workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"wrote {out}")
    return 0


def add_merge_arguments(parser) -> None:
    """Options of ``merge-sets`` (data_tools/merge_sets.py)."""
    parser.add_argument("dirs", nargs="+", help="converted set folders to merge")
    parser.add_argument("--out", required=True, help="output folder (built under a temporary name)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-share", action="store_true",
                        help="give every set its own label slice even when label names are identical")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@_plain_warnings
def run_merge(args) -> int:
    from xtuner_vitask.data.merge import merge_sets

    out = merge_sets(args.dirs, args.out, share_identical=not args.no_share, force=args.force,
                     progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


COMMANDS = {
    "convert-medmnist": (add_medmnist_arguments, run_medmnist,
                         "MedMNIST 2D npz -> images + XTuner InternVL JSONL + meta.json"),
    "convert-external": (add_external_arguments, run_external,
                         "image folder + CSV (image,label) -> the same format, labels of a meta.json"),
    "merge-sets": (add_merge_arguments, run_merge,
                   "merge converted sets into one multi-task set with a joint label space"),
}


def script_main(command: str, argv=None) -> int:
    """Entry point of the data_tools scripts: parse, run, ``error: <msg>`` + exit 2 on bad input."""
    add, run, help_text = COMMANDS[command]
    parser = argparse.ArgumentParser(description=help_text)
    add(parser)
    return run_command(run, parser.parse_args(argv))
