"""Synthetic MedMNIST npz files in the exact layout medmnist publishes (no download needed).

Keys ``{train,val,test}_images`` (uint8, N x H x W for grayscale sets, N x H x W x 3 for RGB sets,
per ``medmnist.INFO['n_channels']``) and ``{split}_labels`` (uint8, N x 1, or N x 14 multi-hot for
ChestMNIST), saved with ``np.savez_compressed`` like the real files.

Two styles of class signal (``learnable=True``; ``learnable=False`` gives background only, labels
without visual signal):

- ``style="grating"`` (default): each class (each finding, for ChestMNIST) is a small patch of an
  oriented grating -- class-specific orientation and frequency, random phase and position -- on a
  textured, noisy background with a random tint. A classifier trained for the task picks the
  texture up; global statistics carry nothing, so a frozen generic encoder sees almost nothing.
- ``style="shapes"``: XXX
  *region*; classes come in pairs that share a region and differ only in shape (disc vs ring,
  square vs cross, ...). Coarse intensity layout -- what any frozen encoder keeps -- tells the pairs
  apart; the shape inside a pair needs finer features, which a task-specific model learns and a
  generic encoder carries only partly. Position, size and contrast jitter, speckle noise,
  class-independent shading and clutter objects (random shapes, random places) make the classes
  overlap, so no model reaches 100 %.
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


# --------------------------------------------------------------------------- shapes style
SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar", "frame", "dots")
# 3 x 3 grid of region centres (fractions of the image side)
REGIONS = ((0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7), (0.5, 0.5), (0.3, 0.5), (0.7, 0.5), (0.5, 0.3),
           (0.5, 0.7))
# How visible a class's object is and how much the rest of the image hides it (fractions of the side,
# grey levels). benchmarks/data_signal.py measures what a frozen encoder and the TSM get from it.
SHAPES_PARAMS = dict(class_shapes=True, radius=(0.29, 0.33), in_region=0.65, jitter=0.07, brightness=(10, 30),
                     texture=(40, 50), period_scale=1.0, clutter=0.3, clutter_contrast=(10, 25), noise=12.0,
                     class_brightness=25.0)
# domain="external": the same classes seen by another "scanner" (paper Table 3's external sets): coarser
# texture, dark instead of bright objects, more noise. A TSM trained on the source set degrades here.
EXTERNAL_SHIFT = dict(period_scale=1.35, brightness=(-30, -10), texture=(30, 45), noise=18.0)


def class_signature(label: int) -> tuple[str, tuple[float, float]]:
    """(shape, usual region centre as fractions (row, col)) of a class in the shapes style."""
    return SHAPES[label % len(SHAPES)], REGIONS[label % len(REGIONS)]


def shape_mask(kind: str, yy, xx, cy, cx, radius):
    """Anti-aliased coverage in [0, 1] of a shape centred at (cy, cx) with half-size ``radius``.

    ``cy, cx, radius`` broadcast against the (H, W) grids ``yy, xx`` (one shape per leading row).
    """
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        dist = np.hypot(dy, dx) - radius
    elif kind == "ring":
        dist = np.abs(np.hypot(dy, dx) - 0.75 * radius) - 0.3 * radius
    elif kind == "square":
        dist = np.maximum(np.abs(dy), np.abs(dx)) - 0.85 * radius
    elif kind == "frame":
        dist = np.abs(np.maximum(np.abs(dy), np.abs(dx)) - 0.7 * radius) - 0.25 * radius
    elif kind == "cross":
        arm = 0.3 * radius
        dist = np.minimum(np.maximum(np.abs(dy) - radius, np.abs(dx) - arm),
                          np.maximum(np.abs(dx) - radius, np.abs(dy) - arm))
    elif kind == "bar":
        dist = np.maximum(np.abs(dy) - 0.35 * radius, np.abs(dx) - 1.2 * radius)
    elif kind == "triangle":  # apex up: inside when below both slanted edges and above the base
        dist = np.maximum(dy - 0.8 * radius, np.abs(dx) * 1.7 - (dy + radius) * 0.85)
    elif kind == "dots":  # three small dots in a row
        dist = np.minimum(np.hypot(dy, dx), np.minimum(np.hypot(dy, dx - radius), np.hypot(dy, dx + radius)))
        dist = dist - 0.35 * radius
    else:
        raise ValueError(kind)
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def _place(rng, n, centre, jitter, size, in_region):
    """Object centres in pixels: near ``centre`` with probability ``in_region``, else anywhere central."""
    anywhere = rng.random((n, 1, 1)) >= in_region
    cy = np.where(anywhere, rng.uniform(0.25, 0.75, (n, 1, 1)), centre[0] + rng.uniform(-jitter, jitter, (n, 1, 1)))
    cx = np.where(anywhere, rng.uniform(0.25, 0.75, (n, 1, 1)), centre[1] + rng.uniform(-jitter, jitter, (n, 1, 1)))
    return cy * size, cx * size


def _shapes_signal(rng, canvas, labels, size, num_classes, multi_label, p):
    """Per class: a bright object of the class's shape, filled with the class's grating texture, usually
    in the class's region. Clutter: a plain random shape at a random place in some images."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # overall brightness leans with the class (classes overlap: per-image brightness varies more than this)
    lean = np.linspace(-1.0, 1.0, num_classes) * p["class_brightness"] if num_classes > 1 else np.zeros(1)
    hot = labels.astype(np.float32) if multi_label else np.eye(num_classes, dtype=np.float32)[labels[:, 0]]
    canvas += (hot @ lean / np.maximum(hot.sum(1), 1)).astype(np.float32)[:, None, None]
    for k in range(num_classes):
        rows = np.flatnonzero(labels[:, k] if multi_label else labels[:, 0] == k)
        if len(rows) == 0:
            continue
        kind, centre = class_signature(k)
        kind = kind if p["class_shapes"] else "square"
        theta, period = class_texture(k, num_classes, size)
        period *= p["period_scale"]
        m = len(rows)
        cy, cx = _place(rng, m, centre, p["jitter"], size, p["in_region"])
        mask = shape_mask(kind, yy, xx, cy, cx, rng.uniform(*p["radius"], (m, 1, 1)) * size)
        phase = rng.uniform(0, 2 * math.pi, (m, 1, 1))
        grating = np.sin(2 * math.pi / period * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        fill = rng.uniform(*p["brightness"], (m, 1, 1)) + rng.uniform(*p["texture"], (m, 1, 1)) * grating
        canvas[rows] += (mask * fill).astype(np.float32)
    rows = np.flatnonzero(rng.random(n) < p["clutter"])
    kinds = rng.integers(len(SHAPES), size=len(rows))
    for index, kind in enumerate(SHAPES):
        pick = rows[kinds == index]
        if len(pick):
            cy, cx = _place(rng, len(pick), (0.5, 0.5), 0, size, 0.0)
            radius = rng.uniform(*p["radius"], (len(pick), 1, 1)) * size * 0.8
            contrast = rng.choice([1, -1], (len(pick), 1, 1)) * rng.uniform(*p["clutter_contrast"], (len(pick), 1, 1))
            canvas[pick] += (contrast * shape_mask(kind, yy, xx, cy, cx, radius)).astype(np.float32)


def _images(rng, labels: np.ndarray, size: int, n_channels: int, num_classes: int,
            multi_label: bool, learnable: bool, style: str = "grating", domain: str = "source") -> np.ndarray:
    shapes = dict(SHAPES_PARAMS, **(EXTERNAL_SHIFT if domain == "external" else {}))
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
    if learnable and style == "shapes":
        _shapes_signal(rng, canvas, labels, size, num_classes, multi_label, shapes)
    elif learnable:
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
    noise = shapes["noise"] if learnable and style == "shapes" else 18.0
    if n_channels == 3:
        tint = rng.uniform(0.6, 1.2, (n, 1, 1, 3)).astype(np.float32)
        canvas = canvas[..., None] * tint + rng.normal(0, noise, (n, size, size, 3)).astype(np.float32)
    else:
        canvas = canvas + rng.normal(0, noise, (n, size, size)).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


STYLES = ("grating", "shapes")
DOMAINS = ("source", "external")


def write_medmnist_npz(path, flag: str, n_per_split=(60, 20, 20), size: int = 28, seed: int = 0,
                       learnable: bool = True, style: str = "grating", domain: str = "source") -> Path:
    """Write a synthetic ``flag`` npz with ``n_per_split`` = (train, val, test) images; returns its path.

    Beside it goes ``<name>.generated.json`` recording how it was made (converters copy it into
    meta.json as ``generated``); the npz itself has exactly medmnist's keys, dtypes and shapes.
    """
    if style not in STYLES or domain not in DOMAINS or (domain == "external" and style != "shapes"):
        raise ValueError(f"style={style!r}, domain={domain!r}: styles {STYLES}, domains {DOMAINS} "
                         "('external' exists for the shapes style)")
    info = dataset_info(flag)
    num_classes = len(info["label"])
    multi_label = task_type(flag) == MULTI_LABEL
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(SPLITS, n_per_split):
        labels = draw_labels(rng, num_classes, int(n), multi_label)
        chunks = [
            _images(rng, labels[start:start + _GENERATION_CHUNK], size, info["n_channels"],
                    num_classes, multi_label, learnable, style, domain)
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
        "style": style if learnable else None, "domain": domain,
        "n_per_split": dict(zip(SPLITS, map(int, n_per_split))),
    }) + "\n")
    return path
