"""Image-classification view of the JSONL data contract, for the task-specific model (TSM).

The same JSONL + images + ``meta.json`` that the VLM trains on are read here without the
instruction formatting: each record gives an image and its labels. Evaluation pixels come from
``xtuner_vitask.ep.exemplar_tsm.tsm_transform`` (through :func:`build_tsm_transform`), the one TSM
preprocessing that VITask's dataset, the exemplar cache, evaluation and the EP export use too.

Labels stay local to the record's task (``label`` in the contract). A merged (multi-task) set
keeps each record's ``task``; the model maps local labels into its joint label space using the
offsets in ``meta['tasks']``.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
from mmengine.registry import DATASETS, FUNCTIONS
from PIL import Image
from torch.utils.data import Dataset

from ..contract import META_FILE, MULTI_LABEL, iter_jsonl, load_meta, problems_report, record_image, record_problems
from ..data.images import read_image
from ..ep.exemplar_tsm import tsm_transform
from ..errors import VITaskError

# timm's ViT defaults (also the ImageNet-21k ViT-B/16's pretrained_cfg): mean = std = 0.5.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def load_rgb_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB (gray sets too: timm backbones take three channels); see ``data.images``."""
    return read_image(path, "RGB")


def build_tsm_transform(img_size: int, mean: Sequence[float] = DEFAULT_MEAN,
                        std: Sequence[float] = DEFAULT_STD, train: bool = False):
    """PIL RGB image -> normalized float CHW tensor of ``img_size`` x ``img_size`` (timm's transforms).

    ``train=False``: the TSM's one preprocessing (:func:`xtuner_vitask.ep.exemplar_tsm.tsm_transform`:
    bicubic resize of the whole image, timm's ViT setting). ``train=True`` adds light augmentation
    for TSM training: a mild random resized crop and a horizontal flip.
    """
    if not train:
        return tsm_transform(img_size, mean, std)
    from timm.data import create_transform

    if int(img_size) <= 0:
        raise VITaskError(f"img_size must be a positive number of pixels, got {img_size}")
    return create_transform(input_size=(3, int(img_size), int(img_size)), is_training=True, scale=(0.8, 1.0),
                            ratio=(0.9, 1.1), hflip=0.5, color_jitter=None, interpolation="bicubic",
                            mean=tuple(mean), std=tuple(std))


def encode_label(label: Iterable[int], task_type: str, num_classes: int, record_id: str) -> torch.Tensor:
    """Contract label (local indices) -> long scalar (single-label) or float multi-hot (multi-label)."""
    label = list(label) if label is not None else []
    bad = [i for i in label if not isinstance(i, int) or not 0 <= i < num_classes]
    if bad:
        raise VITaskError(f"record {record_id}: label {bad} is outside 0..{num_classes - 1}: fix the JSONL")
    if task_type == MULTI_LABEL:
        multi_hot = torch.zeros(num_classes, dtype=torch.float32)
        multi_hot[label] = 1.0
        return multi_hot
    if len(label) != 1:
        raise VITaskError(f"record {record_id}: a {task_type} record needs exactly one label, got {label}")
    return torch.tensor(label[0], dtype=torch.long)


@DATASETS.register_module()
class ImageClassificationDataset(Dataset):
    """Images and labels of one contract JSONL (single data set or merged multi-task set).

    Each item is ``{'inputs': CHW float tensor, 'data_samples': {'gt_label', 'task', 'id'}}``
    where ``gt_label`` is local to ``task`` (see :func:`encode_label`). Batch with
    :func:`tsm_collate` (registered as ``'tsm_collate'`` in mmengine's FUNCTIONS).

    Args:
        data_file: a ``{train,val,test}.jsonl`` of the contract.
        meta_file: its ``meta.json`` (default: beside the JSONL).
        image_folder: root of the records' ``image`` paths (default: the JSONL's folder).
        img_size, mean, std: see :func:`build_tsm_transform`; use the TSM's values.
        train: enable augmentation.
    """

    def __init__(self, data_file: str, meta_file: str | None = None, image_folder: str | None = None,
                 img_size: int = 224, mean: Sequence[float] = DEFAULT_MEAN,
                 std: Sequence[float] = DEFAULT_STD, train: bool = False):
        self.data_file = str(data_file)
        folder = os.path.dirname(os.path.abspath(self.data_file))
        self.meta_file = str(meta_file) if meta_file else os.path.join(folder, META_FILE)
        self.image_folder = str(image_folder) if image_folder else folder
        self.data_meta = load_meta(self.meta_file)
        self.meta = self.data_meta.raw
        self.tasks = {name: task.as_dict() for name, task in self.data_meta.tasks.items()}
        numbered = list(iter_jsonl(self.data_file))
        if not numbered:
            raise VITaskError(f"{self.data_file} has no records: convert a non-empty split with data_tools")
        self.records = [record for _, record in numbered]
        self._check_records([line for line, _ in numbered])
        self.transform = build_tsm_transform(img_size, mean, std, train)

    def _check_records(self, lines):
        """Fail at build time, not mid-epoch: unknown tasks, bad labels or missing images."""
        missing, bad = [], []
        for line, rec in zip(lines, self.records):
            problems = [] if "id" in rec else ["has no 'id'"]
            problems += record_problems(rec, self.data_meta, require_label=True, require_image=True,
                                        conversations=False)
            if problems:
                bad.append((line, "; ".join(problems)))
                continue
            rec["_task"] = self.data_meta.task_of(rec).name  # a single set: every record belongs to it
            rec["image"] = record_image(rec)
            if not os.path.isfile(os.path.join(self.image_folder, rec["image"])):
                missing.append(rec["image"])
        if bad:
            raise VITaskError(problems_report(self.data_file, bad, len(self.records)))
        if missing:
            raise VITaskError(f"{len(missing)} images of {self.data_file} are missing under {self.image_folder} "
                              f"(e.g. {missing[:3]}): pass the right image_folder")

    @property
    def metainfo(self) -> dict:
        """The meta.json (mmengine passes it to the evaluator as ``dataset_meta``)."""
        return dict(self.meta, tasks=self.tasks)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        task = self.tasks[rec["_task"]]
        image = load_rgb_image(os.path.join(self.image_folder, rec["image"]))
        gt = encode_label(rec.get("label"), task["task_type"], task["num_classes"], rec["id"])
        return {"inputs": self.transform(image),
                "data_samples": {"gt_label": gt, "task": rec["_task"], "id": rec["id"]}}


@FUNCTIONS.register_module(name="tsm_collate")
def tsm_collate(batch: list[dict]) -> dict:
    """Stack the images; keep one data-sample dict per image (labels may differ in kind per task)."""
    return {"inputs": torch.stack([item["inputs"] for item in batch]),
            "data_samples": [item["data_samples"] for item in batch]}
