"""Evaluate an exported model on a contract JSONL: rank (likelihood of each label name) or generate.

:func:`evaluate_export` returns (and :func:`write_report` writes) one report: accuracy, macro-F1,
per-class precision/recall/F1 (scikit-learn, via :mod:`.metrics`), the confusion matrix, timing,
and every sample's prediction. In ``generate`` mode an answer that does not parse into the label
set is *unparsable*: counted and listed, and scored as wrong (single-label: it matches no class;
multi-label: every label counts as wrong); ``metrics_parsable`` scores the parsable answers alone.
"""
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from ..errors import VITaskError

MODES = ("rank", "generate")


def read_records(data_path, max_samples=None):
    from ..tsm.dataset import read_jsonl

    records = read_jsonl(data_path)
    for n, record in enumerate(records, 1):
        if "label" not in record or "image" not in record:
            raise VITaskError(f"{data_path} record {n} has no 'label'/'image': evaluation needs labelled images "
                              "(convert the data with data_tools)")
    if not records:
        raise VITaskError(f"{data_path} has no records")
    return records[:max_samples] if max_samples else records


def _task_groups(records, meta):
    """{task name or None: (task meta, records)} -- one group unless the data is a merged multi-task set."""
    if meta.get("task_type") != "multi-task":
        return {None: (meta, records)}
    groups = {}
    for record in records:
        task = record.get("task")
        if task not in meta["tasks"]:
            raise VITaskError(f"record {record.get('id')} has task {task!r}, not one of the model's tasks "
                              f"{sorted(meta['tasks'])}")
        groups.setdefault(task, (meta["tasks"][task], []))[1].append(record)
    return groups


def _train_records(data_path):
    """Training records beside the eval file (multi-label candidates: the label combinations seen in training)."""
    path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "train.jsonl")
    return read_records(path) if os.path.isfile(path) else []


def _label_array(labels, task_type, n):
    if task_type != "multi-label":
        return np.array([lab[0] if lab else -1 for lab in labels])
    out = np.zeros((len(labels), n), dtype=int)
    for row, lab in enumerate(labels):
        out[row, lab] = 1
    return out


def _scored_as_wrong(truth, task_type, n):
    """The prediction an unparsable answer is scored with: no class (single-label), all labels flipped (multi)."""
    if task_type != "multi-label":
        return [-1]
    return [c for c in range(n) if c not in truth]


def _metrics(truths, preds, task_type, n, scores=None):
    from .metrics import classification_metrics

    report = classification_metrics(_label_array(truths, task_type, n), _label_array(preds, task_type, n),
                                    task_type, n, scores=scores)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.items()}


def score_predictions(truths, preds, task_type, num_classes, scores=None):
    """Metrics of predictions (lists of label indices; None = unparsable) against the truths.

    Returns {'metrics': all samples, unparsable ones scored as wrong; 'metrics_parsable': the
    parsable ones alone (None if there are none); 'unparsable': their count}.
    """
    truths = [sorted(t) for t in truths]
    keep = [i for i, p in enumerate(preds) if p is not None]
    scored = [p if p is not None else _scored_as_wrong(t, task_type, num_classes) for p, t in zip(preds, truths)]
    return dict(metrics=_metrics(truths, scored, task_type, num_classes, scores=scores),
                metrics_parsable=_metrics([truths[i] for i in keep], [preds[i] for i in keep], task_type, num_classes)
                if keep else None,
                unparsable=len(preds) - len(keep))


def _load_dataset(info, data_path, use_ep):
    from ..datasets.internvl import InternVL2Dataset

    # one tile per image, as VITaskDataset trains (CRT pairs images tile for tile)
    dataset = InternVL2Dataset(info.path, data_path, dynamic_image_size=False)
    if use_ep:
        from ..export.folder import export_tsm_transform

        dataset.tsm_transform = export_tsm_transform(info)
    return dataset


def evaluate_export(model_dir, data_path, use_ep=None, mode="rank", batch_size=8, max_samples=None,
                    max_new_tokens=None, progress=True, model=None, shared_prefix=True):
    """Score ``model_dir`` (an export folder) on ``data_path``; returns the report dict.

    ``use_ep`` None = EP when the export has a TSM. ``model``: an already loaded wrapper to reuse
    (benchmarks evaluate one model twice). ``shared_prefix``: rank with the prompt computed once
    (:mod:`.prefix_rank`, same scores) instead of one full sequence per candidate (:mod:`.ranking`).
    """
    from ..data.medmnist import parse_response
    from ..export.folder import inspect_export, load_export_model, read_task_meta
    from ..hooks.cls_eval import predictions_to_labels
    from .generate import generate_records
    from .ranking import candidate_responses, rank_records

    if mode not in MODES:
        raise VITaskError(f"--mode {mode}: use one of {', '.join(MODES)}")
    info = inspect_export(model_dir, need_ep=bool(use_ep))
    use_ep = info.has_ep if use_ep is None else bool(use_ep)
    meta = read_task_meta(info, os.path.join(os.path.dirname(os.path.abspath(data_path)), "meta.json"))
    records = read_records(data_path, max_samples)
    image_folder = os.path.dirname(os.path.abspath(data_path))
    missing = next((r["image"] for r in records if not os.path.isfile(os.path.join(image_folder, r["image"]))), None)
    if missing:
        raise VITaskError(f"image {missing} of {data_path} does not exist under {image_folder}: keep the images "
                          "beside the JSONL as data_tools writes them")
    model = model or load_export_model(info, use_ep=use_ep)
    dataset = _load_dataset(info, data_path, use_ep)
    train_records = _train_records(data_path) if meta.get("task_type") in ("multi-label", "multi-task") else []

    report = dict(model=os.path.abspath(model_dir), data=os.path.abspath(data_path), mode=mode, use_ep=use_ep,
                  rank_impl=("shared-prefix" if shared_prefix else "full-sequence") if mode == "rank" else None,
                  variant="ep" if info.has_ep else "plain", n=len(records), tasks={}, samples=[])
    started = time.perf_counter()
    for task, (task_meta, group) in _task_groups(records, meta).items():
        kind, names = task_meta["task_type"], task_meta["label_names"]
        n_cls = len(names)
        task_train = [r for r in train_records if r.get("task") == task or task is None]
        candidates = candidate_responses(meta, task=task, train_records=task_train)
        probs = None
        if mode == "rank":
            scores = rank_records(model, dataset, group, image_folder, candidates, use_ep=use_ep,
                                  batch_size=batch_size, progress=progress, desc=f"rank {task or ''}".strip(),
                                  shared_prefix=shared_prefix)
            best = predictions_to_labels(scores, candidates, kind, n_cls)
            preds = [[int(b)] if kind != "multi-label" else np.flatnonzero(b).tolist() for b in best]
            answers = [candidates[int(i)][0] for i in scores.argmax(1)]
            if kind != "multi-label":  # one candidate per class, in class order
                probs = torch.softmax(scores.float(), dim=1).numpy()
        else:
            if max_new_tokens is None:
                longest = max(len(dataset.tokenizer(c[0], add_special_tokens=False).input_ids) for c in candidates)
                max_new_tokens = longest + 8
            answers = generate_records(model.model, dataset, group, image_folder,
                                       use_ep=use_ep if info.has_ep else None, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens,
                                       tsm_transform=getattr(dataset, "tsm_transform", None),
                                       progress=progress, desc=f"generate {task or ''}".strip())
            preds = [parse_response(kind, names, a) for a in answers]
        truths = [sorted(r["label"]) for r in group]
        parsable = [p is not None for p in preds]
        scored = score_predictions(truths, preds, kind, n_cls, scores=probs)
        task_report = dict(task_type=kind, label_names=names, n=len(group), unparsable=scored["unparsable"],
                           metrics=scored["metrics"])
        if mode == "generate":
            task_report["metrics_parsable"] = scored["metrics_parsable"]
        report["tasks"][task or meta.get("dataset", "task")] = task_report
        for i, record in enumerate(group):
            sample = dict(id=record.get("id"), image=record["image"], task=task, label=truths[i],
                          label_names=[names[c] for c in truths[i]], answer=answers[i], parsable=parsable[i],
                          prediction=preds[i],
                          prediction_names=None if preds[i] is None else [names[c] for c in preds[i]],
                          correct=preds[i] is not None and sorted(preds[i]) == truths[i])
            if probs is not None:
                sample["probabilities"] = [round(float(p), 6) for p in probs[i]]
            report["samples"].append(sample)
    report["seconds"] = time.perf_counter() - started
    report["samples_per_second"] = len(records) / max(report["seconds"], 1e-9)
    report["unparsable"] = sum(t["unparsable"] for t in report["tasks"].values())
    tasks = list(report["tasks"].values())
    for key in ("accuracy", "macro_f1"):
        report[key] = float(np.mean([t["metrics"][key] for t in tasks]))
    return report


def write_report(report, out_dir):
    """out_dir/eval.json (everything) and confusion_matrix[_<task>].png per single-label task; returns paths."""
    from .plots import plot_confusion_matrix

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, task in report["tasks"].items():
        cm = task["metrics"].get("confusion_matrix")
        if cm is None:
            continue
        png_name = "confusion_matrix.png" if len(report["tasks"]) == 1 else f"confusion_matrix_{name}.png"
        png = os.path.join(out_dir, png_name)
        title = f"{name}: {report['mode']}{' + EP' if report['use_ep'] else ''} (acc {task['metrics']['accuracy']:.3f})"
        written.append(plot_confusion_matrix(cm, task["label_names"], png, title=title))
    path = os.path.join(out_dir, "eval.json")
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)
    return [path] + written


def summary_lines(report):
    """A short human-readable table of the report."""
    lines = [f"{report['n']} samples, mode={report['mode']}, EP={'on' if report['use_ep'] else 'off'}, "
             f"{report['seconds']:.1f} s ({report['samples_per_second']:.2f} samples/s)"]
    for name, task in report["tasks"].items():
        m = task["metrics"]
        lines.append(f"[{name}] accuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f}"
                     + (f" unparsable={task['unparsable']}/{task['n']}" if report["mode"] == "generate" else ""))
        lines.append(f"  {'class':<40} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>7}")
        pc = m["per_class"]
        for c, label in enumerate(task["label_names"]):
            lines.append(f"  {label[:40]:<40} {pc['precision'][c]:>9.3f} {pc['recall'][c]:>7.3f} {pc['f1'][c]:>6.3f} "
                         f"{int(pc['support'][c]):>7d}")
    return lines
