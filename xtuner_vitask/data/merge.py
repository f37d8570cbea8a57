"""Merge converted sets into one multi-task training set with a joint label space.

The paper's TSM is one model over all 12 MedMNIST 2D sets with a 70-class head: the three organ
sets (A/C/S) share their 11 organ classes, every other set has its own slice. Here sets whose label
names and task type are identical share one slice (``share_identical=True``), so merging the 12
sets gives exactly those 70 classes. ``meta.json`` maps each task to its slice::

    "tasks": {flag: {"offset": k, "num_classes": n, "label_names": [...], "task_type": ..., ...}}

Records keep their local labels and ``task``; joint index = ``tasks[task]["offset"] + label``.
Images are hard-linked (copied across file systems) to ``OUT/images/{task}/{split}/...``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm import tqdm

from xtuner_vitask.data.external import read_meta
from xtuner_vitask.data.npz import SPLITS
from xtuner_vitask.data.writer import atomic_output_dir, read_jsonl, refuse_existing, write_json, write_jsonl
from xtuner_vitask.errors import VITaskError


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def joint_label_space(metas: list[dict], share_identical: bool = True) -> tuple[list[str], dict]:
    """(joint label names, {task: slice info}) for converted sets' metas, in the given order."""
    joint, tasks, slices = [], {}, {}
    for meta in metas:
        task = meta["dataset"]
        if task in tasks:
            raise VITaskError(f"data set {task!r} is given twice: merge each set once")
        key = (meta["task_type"], tuple(meta["label_names"]))
        if share_identical and key in slices:
            offset = slices[key]
        else:
            offset = len(joint)
            joint.extend(meta["label_names"])
            slices.setdefault(key, offset)
        tasks[task] = {
            "offset": offset,
            "num_classes": len(meta["label_names"]),
            "label_names": list(meta["label_names"]),
            "task_type": meta["task_type"],
            "modality": meta.get("modality"),
            "size": meta.get("size"),
            "n_channels": meta.get("n_channels"),
            "instruction_variant": meta.get("instruction_variant"),
        }
    return joint, tasks


def merge_sets(dirs, out_dir, share_identical: bool = True, force: bool = False, progress: bool = True) -> Path:
    """Merge converted set folders ``dirs`` into ``out_dir`` (see the module docstring); returns it."""
    dirs = [Path(d) for d in dirs]
    if len(dirs) < 2:
        raise VITaskError("give at least two converted set folders to merge")
    out = Path(out_dir)
    refuse_existing(out, force)
    metas = []
    for folder in dirs:
        meta = read_meta(folder / "meta.json")
        if meta["task_type"] == "multi-task":
            raise VITaskError(f"{folder} is already a merged set: merge the single sets it came from")
        metas.append(meta)
    joint, tasks = joint_label_space(metas, share_identical)

    split_records = {split: [] for split in SPLITS}
    links = []
    for folder, meta in zip(dirs, metas):
        task = meta["dataset"]
        for split in SPLITS:
            path = folder / f"{split}.jsonl"
            if not path.is_file():
                continue
            for record in read_jsonl(path):
                source = folder / record["image"]
                if not source.is_file():
                    raise VITaskError(f"{path}: image {record['image']} of {record.get('id')} is missing")
                if record.get("task", task) != task:
                    raise VITaskError(f"{path}: record {record.get('id')} has task {record.get('task')!r}, "
                                      f"meta.json says {task!r}")
                target = f"images/{task}/{split}/{Path(record['image']).name}"
                links.append((source, target))
                split_records[split].append({**record, "image": target, "task": task})
    sizes = {info["size"] for info in tasks.values()}

    with atomic_output_dir(out, force) as tmp:
        for source, target in tqdm(links, desc="merge", unit="img", disable=not progress, mininterval=0.5):
            destination = tmp / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(source, destination)
        for split, records in split_records.items():
            if records:
                write_jsonl(tmp / f"{split}.jsonl", records)
        write_json(tmp / "meta.json", {
            "dataset": "+".join(tasks),
            "task_type": "multi-task",
            "label_names": joint,
            "num_classes": len(joint),
            "tasks": tasks,
            "size": sizes.pop() if len(sizes) == 1 else None,
            "sources": [str(folder.resolve()) for folder in dirs],
            "generated": any(bool(meta.get("generated")) for meta in metas),
            "counts": {
                split: {"total": len(records),
                        "per_task": {t: sum(r["task"] == t for r in records) for t in tasks}}
                for split, records in split_records.items() if records
            },
        })
    return out
