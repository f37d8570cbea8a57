"""Classification metrics shared by the TSM's validation and VITask's evaluation (scikit-learn).

Conventions follow MedMNIST's evaluator:
- single-label (multi-class, binary, ordinal): accuracy; AUC = mean one-vs-rest AUC over the
  classes (for binary, the AUC of the positive class's score).
- multi-label: accuracy = mean over labels of the per-label accuracy at threshold 0.5 (also
  reported: ``exact_match``, the sample-wise subset accuracy); AUC = mean per-label AUC.
Macro-F1 is the unweighted mean of the per-class (per-label) F1. A class whose AUC is undefined
(only one truth value among the samples) is left out of the AUC mean; with none left AUC is NaN.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
                             roc_auc_score)

from xtuner_vitask.contract import MULTI_LABEL, SINGLE_LABEL_TYPES
from xtuner_vitask.errors import VITaskError


def _mean_auc(truth_columns: np.ndarray, score_columns: np.ndarray) -> float:
    """Mean AUC over the columns whose truth has both values."""
    aucs = [roc_auc_score(t, s) for t, s in zip(truth_columns.T, score_columns.T) if 0 < t.sum() < len(t)]
    return float(np.mean(aucs)) if aucs else math.nan


def classification_metrics(y_true, y_pred, task_type: str, num_classes: int, scores=None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, AUC (when ``scores`` given).

    Args:
        y_true, y_pred: (N,) class indices (single-label) or (N, C) 0/1 arrays (multi-label).
        task_type: 'multi-class' | 'binary' | 'ordinal' | 'multi-label'.
        num_classes: C; classes absent from the data still get a (zero) per-class entry.
        scores: (N, C) probabilities (softmax / sigmoid) for AUC.

    Returns a dict of plain Python values: 'accuracy', 'macro_f1', 'auc' (NaN without scores),
    'per_class' {'precision', 'recall', 'f1', 'support'} lists, 'n', and 'confusion_matrix'
    (single-label) or 'exact_match' (multi-label).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise VITaskError(f"{len(y_true)} ground truths but {len(y_pred)} predictions: score the same samples")
    if len(y_true) == 0:
        raise VITaskError("no samples to score: the evaluation set is empty")
    labels = list(range(int(num_classes)))
    if task_type == MULTI_LABEL:
        y_true, y_pred = y_true.reshape(len(y_true), -1).astype(int), y_pred.reshape(len(y_pred), -1).astype(int)
        if y_true.shape[1] != num_classes or y_pred.shape[1] != num_classes:
            raise VITaskError(f"multi-label arrays must be (N, {num_classes}), got {y_true.shape} and {y_pred.shape}")
        report = {"accuracy": float((y_true == y_pred).mean()),
                  "exact_match": float(accuracy_score(y_true, y_pred))}
    elif task_type in SINGLE_LABEL_TYPES:
        y_true, y_pred = y_true.reshape(-1).astype(int), y_pred.reshape(-1).astype(int)
        report = {"accuracy": float(accuracy_score(y_true, y_pred)),
                  "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}
    else:
        raise VITaskError(f"task_type {task_type!r}: use one of {', '.join(SINGLE_LABEL_TYPES + (MULTI_LABEL,))}")
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    report["macro_f1"] = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    report["per_class"] = {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                           "support": support.tolist()}
    report["n"] = int(len(y_true))
    report["auc"] = math.nan
    if scores is not None:
        scores = np.asarray(scores, dtype=float).reshape(len(y_true), -1)
        if scores.shape[1] != num_classes:
            raise VITaskError(f"scores must be (N, {num_classes}), got {scores.shape}")
        if task_type == MULTI_LABEL:
            report["auc"] = _mean_auc(y_true, scores)
        elif num_classes == 2:
            report["auc"] = _mean_auc((y_true == 1).astype(int)[:, None], scores[:, 1:2])
        else:
            one_hot = np.eye(num_classes, dtype=int)[y_true]
            report["auc"] = _mean_auc(one_hot, scores)
    return report


@METRICS.register_module()
class ClassificationMetric(BaseMetric):
    """mmengine metric over the TSM's predictions: accuracy, macro_f1 and auc each validation.

    Reads the dicts that ``TaskSpecificModel(mode='predict')`` returns ('scores', 'pred_label',
    'gt_label', 'task', 'task_type'). Several tasks (a joint TSM) are scored separately, logged
    as ``<task>/accuracy`` etc., and the unweighted means over tasks are logged as ``accuracy``,
    ``macro_f1`` and ``auc`` -- the keys CheckpointHook's ``save_best`` reads. Keys carry no
    prefix unless ``prefix`` is set. The full per-class report of the last evaluation stays in
    ``last_report`` (per task).
    """

    default_prefix = None

    def __init__(self, collect_device: str = "cpu", prefix: str | None = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.last_report: dict = {}

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if "gt_label" not in sample:
                raise VITaskError("ClassificationMetric needs 'gt_label' in each prediction: feed labelled data")
            self.results.append({
                "task": sample.get("task"), "task_type": sample["task_type"],
                "scores": np.asarray(sample["scores"], dtype=np.float32),
                "pred": np.asarray(sample["pred_label"]), "gt": np.asarray(sample["gt_label"])})

    def compute_metrics(self, results: list) -> dict:
        by_task: dict = {}
        for r in results:
            by_task.setdefault(r["task"], []).append(r)
        self.last_report = {}
        for task, rows in by_task.items():
            num_classes = len(rows[0]["scores"])
            self.last_report[task] = classification_metrics(
                np.stack([r["gt"] for r in rows]), np.stack([r["pred"] for r in rows]), rows[0]["task_type"],
                num_classes, scores=np.stack([r["scores"] for r in rows]))
        keys = ("accuracy", "macro_f1", "auc")
        if len(self.last_report) == 1:
            only = next(iter(self.last_report.values()))
            return {k: only[k] for k in keys}
        metrics = {f"{task}/{k}": rep[k] for task, rep in self.last_report.items() for k in keys}
        for k in keys:
            values = [rep[k] for rep in self.last_report.values() if not math.isnan(rep[k])]
            metrics[k] = float(np.mean(values)) if values else math.nan
        return metrics
