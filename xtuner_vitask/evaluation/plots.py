"""Figures for reports and the demo: a confusion matrix, and the loss / validation curves of a run.

matplotlib's Agg backend (no display needed); every PNG is written to a temporary name in the
target folder and renamed when complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Sequence

import numpy as np

from xtuner_vitask.errors import VITaskError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_atomic(fig, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def plot_confusion_matrix(cm, label_names: Sequence[str], path: str, title: str = "Confusion matrix",
                          normalize: bool = False) -> str:
    """Draw a confusion matrix (rows: truth, columns: prediction) with counts in the cells."""
    cm = np.asarray(cm, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(label_names):
        raise VITaskError(f"confusion matrix of shape {cm.shape} does not fit {len(label_names)} label names")
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    plt = _pyplot()
    n = len(label_names)
    side = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    try:
        image = ax.imshow(shown, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
        ax.set_xticklabels(label_names, rotation=45, ha="right")
        ax.set_yticklabels(label_names)
        threshold = shown.max() / 2 if shown.size else 0
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if shown[i, j] > threshold else "black")
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)


def read_scalars(path: str) -> list[dict]:
    """Records of mmengine's ``vis_data/scalars.json`` (or ``<timestamp>.json``): one JSON per line.

    ``path`` may also be a work dir: its newest ``*/vis_data/scalars.json`` is used.
    """
    if os.path.isdir(path):
        found = sorted((os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                        if f == "scalars.json" and root.endswith("vis_data")), key=os.path.getmtime)
        if not found:
            raise VITaskError(f"no */vis_data/scalars.json under {path}: pass an mmengine work dir or the file")
        path = found[-1]
    if not os.path.isfile(path):
        raise VITaskError(f"log file {path} does not exist: pass mmengine's vis_data/scalars.json")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(log_path: str, path: str, title: str = "Training") -> str:
    """Training loss against step, and each validation metric (accuracy, macro_f1, auc) against step."""
    records = read_scalars(log_path)
    train = [r for r in records if "loss" in r]
    val_keys = [k for k in ("accuracy", "macro_f1", "auc") if any(k in r for r in records)]
    if not train and not val_keys:
        raise VITaskError(f"{log_path} has no 'loss' or validation metrics to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        axes[0].plot([r.get("step", i) for i, r in enumerate(train)], [r["loss"] for r in train], lw=1)
        axes[0].set(xlabel="step", ylabel="loss", title=f"{title}: loss")
        for key in val_keys:
            rows = [r for r in records if key in r]
            axes[1].plot([r.get("step", i) for i, r in enumerate(rows)], [r[key] for r in rows],
                         marker="o", label=key)
        axes[1].set(xlabel="epoch / step", ylabel="value", title=f"{title}: validation", ylim=(0, 1.02))
        if val_keys:
            axes[1].legend()
        fig.tight_layout()
        return _save_atomic(fig, path)
    finally:
        plt.close(fig)
