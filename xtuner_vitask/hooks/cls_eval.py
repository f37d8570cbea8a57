"""VITaskEvalHook: classification accuracy and macro-F1 on the val split during training."""
import json
import os
import os.path as osp

import numpy as np
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import VITaskError


def predictions_to_labels(scores, candidates, task_type, num_classes):
    """Best candidate per row -> class index (single-label) or multi-hot row (multi-label)."""
    best = scores.argmax(1).tolist()
    if task_type != "multi-label":
        return np.array([candidates[b][1][0] for b in best])
    out = np.zeros((len(best), num_classes), dtype=int)
    for row, b in enumerate(best):
        out[row, candidates[b][1]] = 1
    return out


def true_labels(records, task_type, num_classes):
    if task_type != "multi-label":
        return np.array([r["label"][0] for r in records])
    out = np.zeros((len(records), num_classes), dtype=int)
    for row, r in enumerate(records):
        out[row, r["label"]] = 1
    return out


@HOOKS.register_module()
class VITaskEvalHook(Hook):
    """Every ``interval`` iterations (and at the end), rank the label names' likelihoods on the
    val split, with and without EP, log accuracy and macro-F1, and keep the best checkpoint.

    Args:
        data_file: val JSONL; None takes val.jsonl beside the training JSONL.
        interval: iterations between evaluations.
        max_samples: evaluate on the first N val samples (cheap during training); None = all.
        best_key: the logged metric whose maximum is kept as ``best_<key>.pth``.
    """

    priority = "LOW"

    def __init__(self, data_file=None, interval=500, max_samples=None, batch_size=8, best_key="macro_f1_no_ep"):
        self.data_file, self.interval, self.max_samples = data_file, interval, max_samples
        self.batch_size, self.best_key = batch_size, best_key
        self.best_score, self.best_path = -1.0, None

    def before_train(self, runner):
        from ..tsm.dataset import read_jsonl
        from ..evaluation.ranking import candidate_responses

        dataset = runner.train_dataloader.dataset
        train_file = dataset_paths(dataset)[0]
        self.data_file = self.data_file or osp.join(osp.dirname(osp.abspath(train_file)), "val.jsonl")
        if not osp.isfile(self.data_file):
            raise VITaskError(f"VITaskEvalHook: val data {self.data_file} does not exist: set data_file=...")
        meta_path = osp.join(osp.dirname(osp.abspath(self.data_file)), "meta.json")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.records = read_jsonl(self.data_file)[: self.max_samples]
        self.candidates = candidate_responses(self.meta, train_records=dataset.data)
        self.image_folder = osp.dirname(osp.abspath(self.data_file))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            self.evaluate(runner)

    def evaluate(self, runner):
        from ..evaluation.metrics import classification_metrics
        from ..evaluation.ranking import rank_records

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        dataset = runner.train_dataloader.dataset
        kind, n_cls = self.meta["task_type"], len(self.meta["label_names"])
        y_true = true_labels(self.records, kind, n_cls)
        results = {}
        for use_ep in (False, True) if hasattr(model, "exemplar_tokens") else (False,):
            scores = rank_records(model, dataset, self.records, self.image_folder, self.candidates,
                                  use_ep=use_ep, batch_size=self.batch_size, exemplars=getattr(dataset, "exemplars", None),
                                  progress=False)
            y_pred = predictions_to_labels(scores, self.candidates, kind, n_cls)
            m = classification_metrics(y_true, y_pred, kind, n_cls)
            suffix = "ep" if use_ep else "no_ep"
            results[f"accuracy_{suffix}"], results[f"macro_f1_{suffix}"] = m["accuracy"], m["macro_f1"]
        for key, value in results.items():
            runner.message_hub.update_scalar(f"val/{key}", value)
        if runner.visualizer is not None:
            runner.visualizer.add_scalars({f"val/{k}": v for k, v in results.items()}, step=runner.iter + 1)
        print_log(f"VITaskEvalHook iter {runner.iter + 1} on {len(self.records)} val samples: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in results.items()), logger="current")
        score = results.get(self.best_key)
        if score is not None and score > self.best_score:
            self.best_score = score
            if self.best_path and osp.isfile(self.best_path):
                os.remove(self.best_path)
            name = f"best_{self.best_key}_iter_{runner.iter + 1}.pth"
            runner.save_checkpoint(runner.work_dir, name, save_optimizer=False, save_param_scheduler=False,
                                   by_epoch=False)
            self.best_path = osp.join(runner.work_dir, name)


def dataset_paths(dataset):
    paths = getattr(dataset, "data_paths", None)
    if paths is None:
        raise VITaskError("VITaskEvalHook needs a dataset that records its data_paths (InternVL2Dataset)")
    return paths
