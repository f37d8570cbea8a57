"""MedMNIST 2D npz -> images + XTuner InternVL JSONL + meta.json (the paper's instruction data).

Output (``OUT``)::

    images/{split}/{index:05d}.png      index = the row in the npz split (kept under subsampling)
    {train,val,test}.jsonl              XTuner InternVL records + "label" (list of ints) + "task"
    meta.json                           data set, task type, label names, counts, source MD5, ...

``image`` in a record is relative to ``OUT``: XTuner's InternVL dataset reads the very same files
with ``image_folders=OUT``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xtuner_vitask.contract import IMAGE_TOKEN, META_FILE, MULTI_LABEL, SPLITS, write_jsonl
from xtuner_vitask.data.medmnist import MODALITY, check_flag, check_size, dataset_info, label_names, task_type
from xtuner_vitask.data.npz import (
    check_layout, expected_md5, file_md5, generated_marker, iter_array_chunks, load_labels, locate_npz, read_layout,
    verify_md5,
)
from xtuner_vitask.data.sampling import stratified_indices, stratum_of, subset_size
from xtuner_vitask.data.writer import PngWriter, atomic_output_dir, refuse_existing, write_json
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.formats import format_response, instruction


def make_record(task: str, split: str, index: int, human: str, response: str, labels) -> dict:
    """One JSONL record of the data contract (image path relative to the output folder)."""
    name = f"{index:05d}"
    return {
        "id": f"{task}/{split}/{name}",
        "image": f"images/{split}/{name}.png",
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{human}"},
            {"from": "gpt", "value": response},
        ],
        "label": [int(i) for i in labels],
        "task": task,
    }


def class_counts(kind: str, labels: list[list[int]], num_classes: int) -> dict:
    """``{"total", "per_class"}`` (+ ``"no_finding"`` for multi-label) of a split's labels."""
    per_class = np.zeros(num_classes, dtype=np.int64)
    for record_labels in labels:
        per_class[record_labels] += 1
    counts = {"total": len(labels), "per_class": per_class.tolist()}
    if kind == MULTI_LABEL:
        counts["no_finding"] = sum(1 for record_labels in labels if not record_labels)
    return counts


def _selected_chunks(path: Path, key: str, keep: np.ndarray):
    """``(names, images)`` chunks of the rows in ``keep`` (sorted), streamed from the npz."""
    for start, rows in iter_array_chunks(path, key):
        lo, hi = np.searchsorted(keep, [start, start + len(rows)])
        picked = keep[lo:hi]
        if len(picked):
            images = rows if len(picked) == len(rows) else rows[picked - start]
            yield [f"{i:05d}.png" for i in picked], images
        if hi == len(keep):
            return  # the rest of the split is not kept


def convert_medmnist(
    flag: str,
    size: int,
    out_dir,
    root=None,
    npz_path=None,
    download: bool = False,
    verify: bool = False,
    instruction_variant: str = "complete",
    limit_per_split: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    force: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Convert one MedMNIST 2D npz into the project's instruction data; returns ``out_dir``.

    ``npz_path`` names the file directly; otherwise medmnist's file name (``dermamnist.npz``,
    ``dermamnist_224.npz``) is looked up under ``root`` (medmnist's ``~/.medmnist`` by default), or
    fetched there by medmnist when ``download``. ``verify`` checks the file against
    ``medmnist.INFO``'s MD5. Everything is checked before anything is written; the output is built
    in ``OUT.tmp-*`` and renamed when complete (an existing ``OUT`` only with ``force``).
    """
    check_flag(flag)
    size = check_size(size)
    instruction("", [], instruction_variant)  # validates the variant
    subset_size(1, limit_per_split, fraction)  # validates the sampling options
    out = Path(out_dir)
    refuse_existing(out, force)

    path = locate_npz(flag, size, root=root, npz_path=npz_path, download=download)
    md5 = file_md5(path)
    if verify:
        verify_md5(path, flag, size, md5)
    counts_in_file = check_layout(read_layout(path), flag, size)
    with np.load(path) as npz:
        labels = {split: load_labels(npz, flag, split, path) for split in SPLITS}

    kind, names = task_type(flag), label_names(flag)
    human = instruction(MODALITY[flag], names, instruction_variant)
    keep = {}
    for split_number, split in enumerate(SPLITS):
        n_keep = subset_size(counts_in_file[split], limit_per_split, fraction)
        strata = [stratum_of(record_labels) for record_labels in labels[split]]
        keep[split] = stratified_indices(strata, n_keep, seed=[seed, split_number])

    meta = {
        "dataset": flag,
        "task_type": kind,
        "label_names": names,
        "num_classes": len(names),
        "modality": MODALITY[flag],
        "size": size,
        "n_channels": dataset_info(flag)["n_channels"],
        "instruction_variant": instruction_variant,
        "instruction": human,
        "source": {
            "file": str(path.resolve()),
            "md5": md5,
            "md5_matches_medmnist": md5 == expected_md5(flag, size),
            "split_sizes": counts_in_file,
        },
        "generated": _generated_info(path),
        "sampling": {"limit_per_split": limit_per_split, "fraction": fraction, "seed": seed},
        "counts": {},
    }
    total = sum(len(keep[split]) for split in SPLITS)
    with atomic_output_dir(out, force) as tmp, PngWriter(workers) as writer, tqdm(
        total=total, desc=f"{flag} {size}px", unit="img", disable=not progress, mininterval=0.5,
    ) as bar:
        for split in SPLITS:
            bar.set_postfix_str(split)
            written = writer.write(
                tmp / "images" / split, _selected_chunks(path, f"{split}_images", keep[split]), bar
            )
            if written != len(keep[split]):
                raise VITaskError(f"{path}: expected {len(keep[split])} {split} images, read {written}")
            split_labels = [labels[split][i] for i in keep[split]]
            write_jsonl(
                tmp / f"{split}.jsonl",
                (
                    make_record(flag, split, int(i), human, format_response(kind, names, lab), lab)
                    for i, lab in zip(keep[split], split_labels)
                ),
            )
            meta["counts"][split] = class_counts(kind, split_labels, len(names))
        write_json(tmp / META_FILE, meta)
    return out


def _generated_info(path: Path):
    """The synthetic-data marker written beside a generated npz, or False for a real file."""
    marker = generated_marker(path)
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) or True
    except (OSError, json.JSONDecodeError):
        return True
