"""Conversion speed: ``convert_medmnist`` vs a plain loop that only encodes and writes the same PNGs.

Generates a PathMNIST-shaped npz (train split of PathMNIST's size, 89,996 RGB images at 28 px, plus
small val/test splits), then times, in one run and on the same disk:

- ``plain loop``: the arrays already in memory, one process, ``encode_png`` for every image (the
  very function, so the same PNG bytes written the same way);
- ``convert_medmnist``: the whole conversion (MD5, checks, streaming the npz, PNGs on ``--workers``
  processes, JSONL, meta.json, atomic rename).

Prints a table with the wall times and the ratio conversion / plain loop (goal <= 1.2x).

    python benchmarks/bench_convert.py            # full size (~1-2 minutes on 2 cores)
    python benchmarks/bench_convert.py --n 5000   # quick
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtuner_vitask.data.convert import convert_medmnist  # noqa: E402
from xtuner_vitask.data.npz import SPLITS, SplitSizeWarning  # noqa: E402
from xtuner_vitask.data.writer import encode_png  # noqa: E402
from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz  # noqa: E402

PATHMNIST_TRAIN = 89_996


def plain_loop(npz_path: Path, out: Path) -> int:
    """Encode and write every image of the npz as PNG, one process, arrays loaded beforehand."""
    with np.load(npz_path) as npz:
        arrays = {split: npz[f"{split}_images"] for split in SPLITS}
    start = time.perf_counter()
    count = 0
    for split, images in arrays.items():
        folder = out / "images" / split
        folder.mkdir(parents=True)
        for index, image in enumerate(images):
            encode_png(image, os.path.join(folder, f"{index:05d}.png"))
            count += 1
    return count, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=PATHMNIST_TRAIN, help="train images (default: PathMNIST's 89,996)")
    parser.add_argument("--size", type=int, default=28, help="image size (default 28)")
    parser.add_argument("--workers", type=int, default=2, help="conversion workers (default 2)")
    parser.add_argument("--workdir", help="folder for the npz and outputs (default: a temporary folder)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        small = max(1, args.n // 100)
        start = time.perf_counter()
        npz_path = write_medmnist_npz(work / "pathmnist.npz", "pathmnist", (args.n, small, small), size=args.size)
        total = args.n + 2 * small
        print(f"generated {npz_path.name}: {total} images at {args.size} px, "
              f"{npz_path.stat().st_size / 2**20:.0f} MiB, in {time.perf_counter() - start:.1f} s")

        os.sync()  # neither timed phase pays for the other's pending writeback
        count, plain_s = plain_loop(npz_path, work / "plain")
        os.sync()
        assert count == total
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SplitSizeWarning)
            out = convert_medmnist("pathmnist", args.size, work / "converted", npz_path=npz_path,
                                   workers=args.workers, progress=False)
        convert_s = time.perf_counter() - start
        assert sum(1 for _ in (out / "images" / "train").iterdir()) == args.n

        rows = [("plain loop (encode + write PNGs, 1 process)", plain_s),
                (f"convert_medmnist (everything, {args.workers} workers)", convert_s)]
        print(f"\n{'method':<52}{'images':>8}{'wall s':>9}{'img/s':>9}{'ratio':>7}")
        for name, seconds in rows:
            print(f"{name:<52}{total:>8}{seconds:>9.2f}{total / seconds:>9.0f}{seconds / plain_s:>6.2f}x")
        print(f"\ncpu cores: {os.cpu_count()}; goal: conversion <= 1.2x the plain loop")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
