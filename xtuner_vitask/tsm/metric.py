"""The TSM's validation metric for mmengine: accuracy, macro-F1 and AUC per task, every epoch."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

from ..errors import VITaskError
from ..metrics import classification_metrics


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
