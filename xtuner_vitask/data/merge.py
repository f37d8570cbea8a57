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
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from xtuner_vitask.contract import (
    META_FILE, MULTI_TASK, SPLITS, DataMeta, iter_jsonl, load_meta, record_image, write_jsonl,
)
from xtuner_vitask.data.writer import atomic_output_dir, refuse_existing, write_json
from xtuner_vitask.errors import VITaskError


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def joint_label_space(metas: list[DataMeta], share_identical: bool = True) -> tuple[list[str], dict]:
    """(joint label names, {task: slice info as in meta.json}) for single sets' metas, in the given order."""
    joint, tasks, slices = [], {}, {}
    for meta in metas:
        task = meta.task()
        if task.name in tasks:
            raise VITaskError(f"data set {task.name!r} is given twice: merge each set once")
        key = (task.task_type, task.label_names)
        if share_identical and key in slices:
            offset = slices[key]
        else:
            offset = len(joint)
            joint.extend(task.label_names)
            slices.setdefault(key, offset)
        tasks[task.name] = replace(task, offset=offset).as_dict()
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
        meta = load_meta(folder / META_FILE)
        if meta.multi_task:
            raise VITaskError(f"{folder} is already a merged set: merge the single sets it came from")
        metas.append(meta)
    joint, tasks = joint_label_space(metas, share_identical)

    split_records = {split: [] for split in SPLITS}
    links = []
    for folder, meta in zip(dirs, metas):
        task = meta.dataset
        for split in SPLITS:
            path = folder / f"{split}.jsonl"
            if not path.is_file():
                continue
            for line, record in iter_jsonl(path):
                image = record_image(record)
                if not isinstance(image, str):
                    raise VITaskError(f"{path} line {line}: the record has no 'image' path")
                source = folder / image
                if not source.is_file():
                    raise VITaskError(f"{path} line {line}: image {image} is missing")
                if record.get("task", task) != task:
                    raise VITaskError(f"{path} line {line}: the record has task {record.get('task')!r}, "
                                      f"meta.json says {task!r}")
                target = f"images/{task}/{split}/{Path(image).name}"
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
        write_json(tmp / META_FILE, {
            "dataset": "+".join(tasks),
            "task_type": MULTI_TASK,
            "label_names": joint,
            "num_classes": len(joint),
            "tasks": tasks,
            "size": sizes.pop() if len(sizes) == 1 else None,
            "sources": [str(folder.resolve()) for folder in dirs],
            "generated": any(bool(meta.raw.get("generated")) for meta in metas),
            "counts": {
                split: {"total": len(records),
                        "per_task": {t: sum(r["task"] == t for r in records) for t in tasks}}
                for split, records in split_records.items() if records
            },
        })
    return out
