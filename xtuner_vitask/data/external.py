"""External image sets (an image folder + a CSV of image,label) -> the same instruction data.

APTOS, IDRiD and MESSIDOR ship this way; the paper (Table 3) tests RetinaMNIST-trained models on
them. The labels are mapped onto an existing converted set's ``meta.json`` (label names, task type,
modality, instruction variant), so the records are exactly what the model was trained to answer.
A CSV label is a label name (any case) or a class index; multi-label rows list several separated
by ``;`` or ``|`` (empty or ``no finding`` = none).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xtuner_vitask.contract import META_FILE, MULTI_TASK, SPLITS, DataMeta, load_meta, write_jsonl
from xtuner_vitask.data.convert import class_counts, make_record
from xtuner_vitask.data.images import read_image
from xtuner_vitask.data.npz import file_md5
from xtuner_vitask.data.writer import PngWriter, atomic_output_dir, encode_png, refuse_existing, write_json
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.formats import NO_FINDING, format_response, instruction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def resolve_label(value: str, label_names: list[str], where: str) -> int:
    """Class index of a CSV label: a label name (case-insensitive) or an index."""
    text = " ".join(str(value).split()).lower()
    lowered = [name.lower() for name in label_names]
    if text in lowered:
        return lowered.index(text)
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and number.is_integer() and 0 <= int(number) < len(label_names):
        return int(number)
    raise VITaskError(
        f"{where}: unknown label {value!r}; use a name ({', '.join(label_names)}) "
        f"or an index 0..{len(label_names) - 1}"
    )


def _labels_of(value: str, meta: DataMeta, where: str) -> list[int]:
    task = meta.task()
    names = list(task.label_names)
    if not task.multi_label:
        return [resolve_label(value, names, where)]
    parts = [p for p in str(value).replace("|", ";").split(";") if p.strip()]
    if len(parts) == 1 and parts[0].strip().lower() == NO_FINDING:
        return []
    return sorted({resolve_label(p, names, where) for p in parts})


def _find_image(image_dir: Path, name: str) -> Path | None:
    path = image_dir / name
    if path.is_file():
        return path
    if not path.suffix:  # APTOS' id_code and IDRiD's "Image name" carry no extension
        for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
            if path.with_name(path.name + suffix).is_file():
                return path.with_name(path.name + suffix)
    return None


def _read_rows(csv_path: Path, image_dir: Path, image_column: str, label_column: str, meta: DataMeta):
    if not csv_path.is_file():
        raise VITaskError(f"CSV file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = {name.strip().lower(): name for name in (reader.fieldnames or [])}
        for column in (image_column, label_column):
            if column.lower() not in fields:
                raise VITaskError(
                    f"{csv_path} has no '{column}' column (columns: {', '.join(fields.values()) or 'none'}); "
                    "name them with --image-column/--label-column"
                )
        image_key, label_key = fields[image_column.lower()], fields[label_column.lower()]
        rows = []
        for line, row in enumerate(reader, 2):
            where = f"{csv_path.name} line {line}"
            name = (row.get(image_key) or "").strip()
            path = _find_image(image_dir, name) if name else None
            if path is None:
                raise VITaskError(f"{where}: image {name!r} not found in {image_dir}")
            rows.append((path, _labels_of(row.get(label_key) or "", meta, where)))
    if not rows:
        raise VITaskError(f"{csv_path} lists no images")
    return rows


def load_external_image(path: Path, size: int | None, n_channels: int) -> np.ndarray:
    """An image as uint8 array in the set's channel count, centre-cropped square and resized to ``size``.

    16-bit and float images are rescaled to 8 bits by :func:`~xtuner_vitask.data.images.read_image`.
    """
    from PIL import Image

    image = read_image(path, "L" if n_channels == 1 else "RGB")
    if size:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def _convert_chunk(task) -> int:
    """Worker: read, crop/resize and write one chunk of external images as PNG."""
    directory, items, size, n_channels = task
    for index, path in items:
        encode_png(load_external_image(path, size, n_channels), os.path.join(directory, f"{index:05d}.png"))
    return len(items)


def _chunks(rows, directory, size, n_channels, chunk=32):
    for start in range(0, len(rows), chunk):
        items = [(start + i, path) for i, (path, _) in enumerate(rows[start:start + chunk])]
        yield str(directory), items, size, n_channels


def convert_external(
    image_dir,
    csv_path,
    meta_path,
    out_dir,
    split: str = "test",
    name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    size: int | None = None,
    instruction_variant: str | None = None,
    force: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Convert an image folder + CSV into ``OUT/{split}.jsonl`` with the label space of ``meta_path``.

    Images are centre-cropped to a square and resized to ``size`` (default: the meta's size, as
    MedMNIST preprocesses; ``size=0`` keeps them as they are) in the meta's channel count. Records
    carry the meta's task as ``task``; the instruction is the meta's (variant overridable).
    """
    data_meta = load_meta(meta_path)
    if data_meta.multi_task:
        raise VITaskError(f"{data_meta.where} is a merged ({MULTI_TASK}) set: give the meta.json of the single set "
                          "whose labels the external images carry")
    meta = data_meta.raw
    if split not in SPLITS:
        raise VITaskError(f"unknown split {split!r}: choose {', '.join(SPLITS)}")
    variant = instruction_variant or meta.get("instruction_variant", "complete")
    human = instruction(meta.get("modality", "medical"), meta["label_names"], variant)
    out = Path(out_dir)
    refuse_existing(out, force)
    image_dir, csv_path = Path(image_dir), Path(csv_path)
    if not image_dir.is_dir():
        raise VITaskError(f"image folder not found: {image_dir}")
    rows = _read_rows(csv_path, image_dir, image_column, label_column, data_meta)
    size = meta.get("size") if size is None else (int(size) or None)
    n_channels = int(meta.get("n_channels", 3))
    task, kind, names = data_meta.dataset, data_meta.task_type, list(data_meta.label_names)
    name = name or csv_path.stem
    labels = [record_labels for _, record_labels in rows]

    with atomic_output_dir(out, force) as tmp, PngWriter(workers) as writer, tqdm(
        total=len(rows), desc=f"{name} {split}", unit="img", disable=not progress, mininterval=0.5,
    ) as bar:
        (tmp / "images" / split).mkdir(parents=True)
        writer.run(_convert_chunk, _chunks(rows, tmp / "images" / split, size, n_channels), bar)
        records = []
        for index, (path, record_labels) in enumerate(rows):
            record = make_record(task, split, index, human, format_response(kind, names, record_labels),
                                 record_labels)
            record["id"] = f"{name}/{split}/{index:05d}"
            record["source_image"] = path.name
            records.append(record)
        write_jsonl(tmp / f"{split}.jsonl", records)
        write_json(tmp / META_FILE, {
            **{k: v for k, v in meta.items() if k not in ("counts", "source", "sampling", "generated")},
            "size": size,
            "n_channels": n_channels,
            "instruction_variant": variant,
            "instruction": human,
            "external": {
                "name": name,
                "image_dir": str(image_dir.resolve()),
                "csv": str(csv_path.resolve()),
                "csv_md5": file_md5(csv_path),
                "label_space_from": str(Path(data_meta.where).resolve()),
            },
            "generated": False,
            "counts": {split: class_counts(kind, labels, len(names))},
        })
    return out
