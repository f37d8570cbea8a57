"""Classification metrics (MedMNIST conventions), the mmengine metric, and the plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from xtuner_vitask.errors import VITaskError
from xtuner_vitask.metrics import classification_metrics
from xtuner_vitask.tsm.metric import ClassificationMetric
from xtuner_vitask.evaluation.plots import plot_confusion_matrix, plot_loss_curves


def test_multi_class_metrics_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    rep = classification_metrics(y_true, y_pred, "multi-class", 3)
    assert rep["accuracy"] == pytest.approx(4 / 6)
    # per class: P = [1/2, 2/3, 1], R = [1/2, 1, 1/2] -> F1 = [0.5, 0.8, 2/3]
    assert rep["per_class"]["precision"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert rep["per_class"]["recall"] == pytest.approx([0.5, 1.0, 0.5])
    assert rep["per_class"]["f1"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert rep["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert rep["per_class"]["support"] == [2, 2, 2] and math.isnan(rep["auc"])


def test_absent_class_counts_in_macro_f1_and_is_skipped_in_auc():
    y_true = [0, 0, 1, 1]
    scores = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    rep = classification_metrics(y_true, scores.argmax(1), "multi-class", 3, scores=scores)
    assert rep["accuracy"] == 1.0
    assert rep["macro_f1"] == pytest.approx(2 / 3)  # class 2 never occurs and is never predicted: F1 0
    assert rep["auc"] == pytest.approx(1.0)  # mean over classes 0 and 1 only
    assert len(rep["per_class"]["f1"]) == 3


def test_binary_auc_uses_positive_score():
    y_true = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # one pair misordered -> AUC 0.75
    scores = np.stack([1 - p1, p1], 1)
    rep = classification_metrics(y_true, (p1 > 0.5).astype(int), "binary", 2, scores=scores)
    assert rep["auc"] == pytest.approx(0.75)
    assert rep["accuracy"] == pytest.approx(0.5)


def test_multi_label_follows_medmnist_convention():
    y_true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.4], [0.3, 0.8, 0.1], [0.7, 0.3, 0.2], [0.2, 0.1, 0.6]])
    y_pred = (scores > 0.5).astype(int)
    rep = classification_metrics(y_true, y_pred, "multi-label", 3, scores=scores)
    # per-label accuracy: label0 4/4, label1 3/4, label2 2/4 -> mean 0.75 (== element-wise mean)
    assert rep["accuracy"] == pytest.approx(0.75)
    assert rep["exact_match"] == pytest.approx(1 / 4)  # only row 1 is fully right
    # per-label F1: 1.0, 2/3 (P 1, R 1/2), 0 (P 0, R 0)
    assert rep["per_class"]["f1"] == pytest.approx([1.0, 2 / 3, 0.0])
    assert rep["macro_f1"] == pytest.approx((1 + 2 / 3) / 3)
    # per-label AUC: label0 1.0, label1 1.0 (0.8, 0.3 above 0.2, 0.1), label2: pos 0.4 vs neg 0.1, 0.2, 0.6 -> 2/3
    assert rep["auc"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert "confusion_matrix" not in rep


def test_bad_inputs():
    with pytest.raises(VITaskError, match="task_type"):
        classification_metrics([0], [0], "regression", 2)
    with pytest.raises(VITaskError, match="predictions"):
        classification_metrics([0, 1], [0], "multi-class", 2)
    with pytest.raises(VITaskError, match="empty"):
        classification_metrics([], [], "multi-class", 2)
    with pytest.raises(VITaskError, match=r"\(N, 3\)"):
        classification_metrics([[1, 0]], [[1, 0]], "multi-label", 3)


def _pred(task, task_type, scores, gt):
    scores = torch.tensor(scores)
    pred = (scores > 0.5).float() if task_type == "multi-label" else scores.argmax()
    return {"task": task, "task_type": task_type, "scores": scores, "pred_label": pred, "gt_label": torch.tensor(gt)}


def test_classification_metric_single_task():
    metric = ClassificationMetric()
    metric.process(None, [_pred("d", "multi-class", [0.7, 0.2, 0.1], 0), _pred("d", "multi-class", [0.1, 0.8, 0.1], 1)])
    metric.process(None, [_pred("d", "multi-class", [0.2, 0.3, 0.5], 1)])
    out = metric.evaluate(3)
    assert set(out) == {"accuracy", "macro_f1", "auc"}  # no prefix: CheckpointHook's save_best='macro_f1' finds it
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert metric.last_report["d"]["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_classification_metric_joint_tasks_are_scored_separately_and_averaged():
    metric = ClassificationMetric()
    metric.process(None, [_pred("a", "multi-class", [0.9, 0.1], 0), _pred("a", "multi-class", [0.2, 0.8], 1),
                          _pred("c", "multi-label", [0.9, 0.2], [1, 0]), _pred("c", "multi-label", [0.9, 0.6], [0, 1])])
    out = metric.evaluate(4)
    assert out["a/accuracy"] == 1.0 and out["c/accuracy"] == pytest.approx(0.75)  # 3 of 4 label decisions
    assert out["accuracy"] == pytest.approx(0.875)
    assert out["macro_f1"] == pytest.approx((out["a/macro_f1"] + out["c/macro_f1"]) / 2)


def test_plots_write_pngs(tmp_path):
    path = plot_confusion_matrix([[5, 1], [2, 7]], ["benign", "malignant"], tmp_path / "sub" / "cm.png", "test")
    assert Image.open(path).size[0] > 100
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cm.png"]  # no temporary file left
    with pytest.raises(VITaskError, match="label names"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a"], tmp_path / "x.png")
    vis = tmp_path / "work" / "20260101_000000" / "vis_data"
    vis.mkdir(parents=True)
    lines = [{"loss": 1.0 / (i + 1), "lr": 1e-3, "step": i, "epoch": 1} for i in range(1, 6)]
    lines += [{"accuracy": 0.5, "macro_f1": 0.4, "auc": 0.7, "step": 1}, {"accuracy": 0.8, "macro_f1": 0.7, "step": 2}]
    (vis / "scalars.json").write_text("\n".join(json.dumps(r) for r in lines))
    out = plot_loss_curves(tmp_path / "work", tmp_path / "curves.png")  # a work dir is searched
    assert Image.open(out).format == "PNG"
    with pytest.raises(VITaskError, match="no \\*/vis_data"):
        plot_loss_curves(tmp_path / "sub", tmp_path / "c2.png")
