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

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
                             roc_auc_score)

from .contract import MULTI_LABEL, SINGLE_LABEL_TYPES
from .errors import VITaskError


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
