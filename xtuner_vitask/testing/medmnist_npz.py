"""Synthetic MedMNIST npz files in the exact layout medmnist publishes (no download needed).

Keys ``{train,val,test}_images`` (uint8, N x H x W for grayscale sets, N x H x W x 3 for RGB sets,
per ``medmnist.INFO['n_channels']``) and ``{split}_labels`` (uint8, N x 1, or N x 14 multi-hot for
ChestMNIST), saved with ``np.savez_compressed`` like the real files.

With ``learnable=True`` each class (each finding, for ChestMNIST) is a small patch of an oriented
grating -- class-specific orientation and spatial frequency, random phase and random position --
on a textured, noisy background with a random (class-independent) tint. A classifier trained for
the task picks the texture up quickly; global statistics (mean colour, brightness) carry nothing,
so a frozen random encoder with a linear probe finds it much harder. With ``learnable=False`` the
images are background only and the labels carry no visual signal.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from xtuner_vitask.contract import MULTI_LABEL, SPLITS
from xtuner_vitask.data.medmnist import dataset_info, task_type
from xtuner_vitask.data.npz import generated_marker

_GENERATION_CHUNK = 2048  # images built at once (bounded float32 scratch memory)


def class_weights(num_classes: int) -> np.ndarray:
    """Mildly imbalanced class frequencies (class 0 the most common, like most real sets)."""
    weights = 1.0 / (1.0 + 0.25 * np.arange(num_classes))
    return weights / weights.sum()


def draw_labels(rng, num_classes: int, n: int, multi_label: bool) -> np.ndarray:
    """Labels in MedMNIST's layout: (n, 1) class indices or (n, K) multi-hot, all uint8.

    Every class (finding) occurs at least once when ``n`` allows.
    """
    if multi_label:
        present = 0.10 / (1.0 + 0.10 * np.arange(num_classes))  # ~40% of images with no finding
        labels = (rng.random((n, num_classes)) < present).astype(np.uint8)
        for k in range(min(n, num_classes)):
            labels[k, k] = 1
    else:
        labels = rng.choice(num_classes, size=(n, 1), p=class_weights(num_classes)).astype(np.uint8)
        labels[: min(n, num_classes), 0] = np.arange(min(n, num_classes))
    return labels[rng.permutation(n)]


def class_texture(label: int, num_classes: int, size: int) -> tuple[float, float]:
    """(orientation in radians, period in pixels) of a class's grating."""
    n_orientations = min(num_classes, 6)
    orientation = math.pi * (label % n_orientations) / n_orientations
    period = (3.5, 5.5, 8.5)[label // n_orientations] * size / 28
    return orientation, period


def _images(rng, labels: np.ndarray, size: int, n_channels: int, num_classes: int,
            multi_label: bool, learnable: bool) -> np.ndarray:
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    patch = max(4, size // 2)
    canvas = 110 + rng.normal(0, 15, (n, 1, 1)).astype(np.float32)
    for _ in range(2):  # class-independent low-frequency shading
        theta = rng.uniform(0, math.pi, (n, 1, 1))
        period = rng.uniform(size / 2, 2 * size, (n, 1, 1))
        phase = rng.uniform(0, 2 * math.pi, (n, 1, 1))
        canvas = canvas + 20 * np.sin(
            2 * math.pi / period * (xx * np.cos(theta) + yy * np.sin(theta)) + phase
        ).astype(np.float32)
    if learnable:
        for k in range(num_classes):
            rows = np.flatnonzero(labels[:, k] if multi_label else labels[:, 0] == k)
            if len(rows) == 0:
                continue
            theta, period = class_texture(k, num_classes, size)
            phase = rng.uniform(0, 2 * math.pi, (len(rows), 1, 1))
            top = rng.integers(0, size - patch + 1, (len(rows), 1, 1))
            left = rng.integers(0, size - patch + 1, (len(rows), 1, 1))
            inside = (yy >= top) & (yy < top + patch) & (xx >= left) & (xx < left + patch)
            grating = np.sin(2 * math.pi / period * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
            canvas[rows] += 45 * inside * grating.astype(np.float32)
    if n_channels == 3:
        tint = rng.uniform(0.6, 1.2, (n, 1, 1, 3)).astype(np.float32)
        canvas = canvas[..., None] * tint + rng.normal(0, 18, (n, size, size, 3)).astype(np.float32)
    else:
        canvas = canvas + rng.normal(0, 18, (n, size, size)).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def write_medmnist_npz(path, flag: str, n_per_split=(60, 20, 20), size: int = 28, seed: int = 0,
                       learnable: bool = True) -> Path:
    """Write a synthetic ``flag`` npz with ``n_per_split`` = (train, val, test) images; returns its path.

    Beside it goes ``<name>.generated.json`` recording how it was made (converters copy it into
    meta.json as ``generated``); the npz itself has exactly medmnist's keys, dtypes and shapes.
    """
    info = dataset_info(flag)
    num_classes = len(info["label"])
    multi_label = task_type(flag) == MULTI_LABEL
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(SPLITS, n_per_split):
        labels = draw_labels(rng, num_classes, int(n), multi_label)
        chunks = [
            _images(rng, labels[start:start + _GENERATION_CHUNK], size, info["n_channels"],
                    num_classes, multi_label, learnable)
            for start in range(0, int(n), _GENERATION_CHUNK)
        ]
        image_shape = (size, size) if info["n_channels"] == 1 else (size, size, 3)
        arrays[f"{split}_images"] = np.concatenate(chunks) if chunks else np.zeros((0,) + image_shape, np.uint8)
        arrays[f"{split}_labels"] = labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a file object keeps numpy from appending ".npz"
        np.savez_compressed(handle, **arrays)
    generated_marker(path).write_text(json.dumps({
        "generator": "xtuner_vitask.testing.medmnist_npz.write_medmnist_npz",
        "flag": flag, "size": size, "seed": seed, "learnable": learnable,
        "n_per_split": dict(zip(SPLITS, map(int, n_per_split))),
    }) + "\n")
    return path
