"""One evaluation loop for the CLI (``xtuner-vitask eval``) and the training-time ``VITaskEvalHook``.

:func:`evaluate_records` scores records task by task (a merged multi-task set is evaluated per
task, each in its own label space), by likelihood ranking or by generation, optionally sharded
over the ranks of a distributed run (every rank scores its shard; the results are gathered in
record order, so the metrics equal the single-process ones). Its results -- accuracy, macro-F1,
per-class precision/recall/F1 (scikit-learn, :mod:`.metrics`), the confusion matrix and every
sample's prediction -- make the report that :func:`write_report` writes
(``xtuner_vitask.inference.exports.evaluate_export`` builds it for an export folder). In
``generate`` mode an answer that does not parse into the label set is *unparsable*: counted, listed, and scored as wrong (single-label: it matches no class;
multi-label: every label counts as wrong); ``metrics_parsable`` scores the parsable answers alone.
"""
import json
import math
import os
import tempfile

import numpy as np
import torch

from ..contract import (MULTI_LABEL, DataMeta, iter_jsonl, parse_meta, problems_report, read_jsonl, record_image,
                        record_problems)
from ..data.images import probe_images
from ..errors import VITaskError

MODES = ("rank", "generate")


# ---------------------------------------------------------------------------------------- data
def as_meta(meta):
    """The contract's DataMeta of a DataMeta or a meta.json's content (e.g. an export's task_meta.json)."""
    return meta if isinstance(meta, DataMeta) else parse_meta(meta)


def read_records(data_path, meta, max_samples=None, check_images=True):
    """The labelled records of ``data_path`` (the first ``max_samples``), checked before any model runs.

    Every record needs conversations with one ``<image>``, an ``image`` (one path) that opens as an
    image, a ``label`` in its task's classes and (merged sets) a ``task`` of the meta.json. All bad
    records are reported at once, by line number, in one VITaskError.
    """
    meta = as_meta(meta)
    if max_samples is not None and int(max_samples) < 1:
        raise VITaskError(f"max_samples={max_samples}: use a positive number (or None for every record)")
    problems, numbered = [], []
    for line, record in iter_jsonl(data_path, problems):
        numbered.append((line, record))
        if max_samples and len(numbered) == max_samples:
            break
    total = len(numbered) + len(problems)  # lines that are not JSON objects count as records too
    if not total:
        raise VITaskError(f"{data_path} has no records: evaluate a non-empty split")
    folder = os.path.dirname(os.path.abspath(data_path))
    to_probe = []
    for line, record in numbered:
        found = record_problems(record, meta, require_label=True, require_image=True)
        problems += [(line, text) for text in found]
        if not found:
            record["image"] = record_image(record)  # XTuner's one-element list -> the path
            to_probe.append((line, os.path.join(folder, record["image"])))
    if check_images and to_probe:
        probes = probe_images([path for _, path in to_probe])
        problems += [(line, f"{result}: {path}") for (line, path), result in zip(to_probe, probes)
                     if isinstance(result, str)]
    if problems:
        raise VITaskError(problems_report(data_path, problems, total))
    return [record for _, record in numbered]


def task_groups(records, meta):
    """[(TaskMeta, records of the task)], tasks in the order they first appear (one for a single set)."""
    meta, groups = as_meta(meta), {}
    for record in records:
        groups.setdefault(meta.task_of(record).name, []).append(record)
    return [(meta.tasks[name], group) for name, group in groups.items()]


def train_records_beside(data_path, meta):
    """train.jsonl beside an eval file (multi-label candidates: the label combinations seen in training)."""
    multi_label = any(task.multi_label for task in as_meta(meta).tasks.values())
    path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "train.jsonl")
    return read_jsonl(path, allow_empty=True) if multi_label and os.path.isfile(path) else []


# -------------------------------------------------------------------------------- distribution
def dist_info():
    from mmengine.dist import get_dist_info

    return get_dist_info()


def shard_indices(n, rank, world):
    """One rank's record indices: round-robin over the list padded (by wrapping) to a multiple of ``world``,
    as mmengine's DefaultSampler shards, so every rank runs the same number of batches."""
    total = -(-n // world) * world
    return [i % n for i in range(rank, total, world)]


def gather_shards(local, n):
    """Every rank's results of :func:`shard_indices`, in record order, on every rank (the metrics and the
    best-checkpoint decision are then the same everywhere). ``local`` is (results, error message or None);
    an error on any rank is raised on all of them."""
    rank, world = dist_info()
    if world == 1:
        parts = [local]
    else:
        from mmengine.dist import all_gather_object

        parts = all_gather_object(local)
    errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(parts) if err]
    if errors:
        raise VITaskError("evaluation failed on " + "; ".join(errors))
    ordered = [item for row in zip(*(results for results, _ in parts)) for item in row]
    return ordered[:n]


def _run_shard(fn, records, distributed):
    """``fn`` over this rank's shard of ``records`` -> the results of all records, in order."""
    rank, world = dist_info() if distributed else (0, 1)
    if world == 1:
        return fn(records)
    mine = [records[i] for i in shard_indices(len(records), rank, world)]
    try:
        local = (fn(mine), None)
    except Exception as err:  # noqa: BLE001 -- every rank must reach the gather, then all raise together
        local = ([], f"{type(err).__name__}: {err}")
    return gather_shards(local, len(records))


# ------------------------------------------------------------------------------------ metrics
def _label_array(labels, task_type, n):
    if task_type != MULTI_LABEL:
        return np.array([lab[0] if lab else -1 for lab in labels])
    out = np.zeros((len(labels), n), dtype=int)
    for row, lab in enumerate(labels):
        out[row, lab] = 1
    return out


def _scored_as_wrong(truth, task_type, n):
    """The prediction an unparsable answer is scored with: no class (single-label), all labels flipped (multi)."""
    if task_type != MULTI_LABEL:
        return [-1]
    return [c for c in range(n) if c not in truth]


def _metrics(truths, preds, task_type, n, scores=None):
    from ..metrics import classification_metrics

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


def mean_over_tasks(tasks, key):
    """Unweighted mean of a metric over the tasks of a report (the value itself for one task)."""
    return float(np.mean([t["metrics"][key] for t in tasks.values()]))


# -------------------------------------------------------------------------------- the loop
def evaluate_records(model, inputs, records, meta, image_folder, *, mode="rank", use_ep=False, batch_size=8,
                     strategy="shared-prefix", max_new_tokens=None, train_records=(), exemplars=None,
                     progress=True, distributed=False, hf_use_ep=None):
    """Score ``records`` (checked by :func:`read_records`) task by task; returns {'tasks', 'samples'}.

    ``model``: the project's wrapper (``InternVL2`` / ``VITaskInternVL``); ``inputs``: its
    :class:`.inputs.ModelInputs`. ``train_records``: multi-label candidates (label combinations seen
    in training). ``exemplars``: cached EP exemplars by record id (else the TSM runs).
    ``distributed``: each rank scores its shard and every rank gets all results. ``hf_use_ep``:
    generate mode, the ``use_ep`` passed to the export's ``generate`` (None: a plain export).
    ``tasks`` maps each task name (the data set's name for a single set) to task_type,
    label_names, n, unparsable, metrics (and metrics_parsable in generate mode).
    """
    from ..formats import parse_response
    from .generate import default_max_new_tokens, generate_records
    from .ranking import best_labels, candidate_responses, rank_records

    if mode not in MODES:
        raise VITaskError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    meta = as_meta(meta)
    out = dict(tasks={}, samples=[])
    for task, group in task_groups(records, meta):
        kind, names = task.task_type, list(task.label_names)
        n_cls = len(names)
        candidates = candidate_responses(task, [r for r in train_records
                                                if not meta.multi_task or r.get("task") == task.name])
        desc = f"{mode} {task.name if meta.multi_task else ''}".strip()
        probs = None
        if mode == "rank":
            scores = torch.cat(_run_shard(
                lambda part: list(rank_records(model, inputs, part, image_folder, candidates, use_ep=use_ep,
                                               batch_size=batch_size, exemplars=exemplars, strategy=strategy,
                                               progress=progress, desc=desc).split(1)),
                group, distributed))
            preds = best_labels(scores, candidates)
            answers = [candidates[int(i)][0] for i in scores.argmax(1)]
            if kind != MULTI_LABEL:  # one candidate per class, in class order
                probs = torch.softmax(scores.float(), dim=1).numpy()
        else:
            new_tokens = max_new_tokens or default_max_new_tokens(inputs, candidates)
            answers = _run_shard(
                lambda part: generate_records(model.model, inputs, part, image_folder, use_ep=hf_use_ep,
                                              batch_size=batch_size, max_new_tokens=new_tokens, progress=progress,
                                              desc=desc),
                group, distributed)
            preds = [parse_response(kind, names, a) for a in answers]
        truths = [sorted(r["label"]) for r in group]
        scored = score_predictions(truths, preds, kind, n_cls, scores=probs)
        task_report = dict(task_type=kind, label_names=names, n=len(group), unparsable=scored["unparsable"],
                           metrics=scored["metrics"])
        if mode == "generate":
            task_report["metrics_parsable"] = scored["metrics_parsable"]
        out["tasks"][task.name] = task_report
        for i, record in enumerate(group):
            sample = dict(id=record.get("id"), image=record["image"], task=task.name if meta.multi_task else None,
                          label=truths[i],
                          label_names=[names[c] for c in truths[i]], answer=answers[i], parsable=preds[i] is not None,
                          prediction=preds[i],
                          prediction_names=None if preds[i] is None else [names[c] for c in preds[i]],
                          correct=preds[i] is not None and sorted(preds[i]) == truths[i])
            if probs is not None:
                sample["probabilities"] = [round(float(p), 6) for p in probs[i]]
            out["samples"].append(sample)
    return out


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
