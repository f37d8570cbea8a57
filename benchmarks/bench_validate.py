"""Cost of checking every training record up front (``InternVL2Dataset(validate=True)``).

Converts a generated DermaMNIST-layout set (``--n`` train images at ``--size`` px) once, builds a
tiny InternVL2 checkpoint, then times side by side, alternating over ``--rounds``:

- ``build``: ``InternVL2Dataset(validate=False)`` (XTuner's reading + token lengths);
- ``build + validate``: the same with every record checked (JSON, turns, labels, images, tokens);
- ``image check``: :func:`probe_images` alone over every image (PNG chunk CRCs, no decoding);
- ``full decode``: :func:`read_image` of every image (what checking by decoding would cost).

Prints per-100k-record seconds (measured on ``--n``, scaled linearly) and ratios.

    python benchmarks/bench_validate.py              # 20,000 records at 28 px
    python benchmarks/bench_validate.py --size 224 --n 3000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="train records (default 20,000)")
    parser.add_argument("--size", type=int, default=28, help="image size (default 28)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--workdir", help="folder for the data and the tiny model (default: a temporary folder)")
    args = parser.parse_args(argv)

    from xtuner_vitask.contract import read_jsonl
    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.data.images import probe_images, read_image
    from xtuner_vitask.datasets import InternVL2Dataset
    from xtuner_vitask.datasets.internvl import check_workers
    from xtuner_vitask.testing import build_tiny_internvl
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_validate_"))
    data = work / f"derma_{args.size}_{args.n}"
    if not (data / "train.jsonl").is_file():
        suffix = "" if args.size == 28 else f"_{args.size}"
        npz = write_medmnist_npz(work / f"dermamnist{suffix}.npz", "dermamnist", (args.n, 8, 8), size=args.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_medmnist("dermamnist", args.size, data, npz_path=npz, progress=False, force=True)
    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_internvl(model, llm="qwen2")
    train = str(data / "train.jsonl")
    paths = [str(data / r["image"]) for r in read_jsonl(train)]

    def build(validate):
        return lambda: InternVL2Dataset(str(model), train, dynamic_image_size=False, max_length=512,
                                        validate=validate)

    cases = {"build": build(False), "build + validate": build(True),
             "image check": lambda: probe_images(paths, workers=check_workers()),
             "full decode": lambda: [read_image(p) for p in paths]}
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            times[name].append(timed(case))
    median = {name: statistics.median(values) for name, values in times.items()}
    scale = 100_000 / len(paths)
    print(f"\n{len(paths)} records, {args.size} px PNGs, {check_workers()} check process(es), "
          f"medians of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}\n")
    print("| step | s per 100k records | x build |")
    print("|---|---:|---:|")
    for name, value in median.items():
        print(f"| {name} | {value * scale:.1f} | {value / median['build']:.2f} |")
    extra = median["build + validate"] - median["build"]
    print(f"\nvalidation adds {extra * scale:.1f} s per 100k records; decoding every image instead of the "
          f"image check would cost {median['full decode'] / median['image check']:.1f}x the image check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
