"""One evaluation loop for the CLI (``xtuner-vitask eval``) and the training-time ``VITaskEvalHook``.

:func:`evaluate_records` scores records task by task (a merged multi-task set is evaluated per
task, each in its own label space), by likelihood ranking or by generation, optionally sharded
over the ranks of a distributed run (every rank scores its shard; the results are gathered in
record order, so the metrics equal the single-process ones). Its results -- accuracy, macro-F1,
per-class precision/recall/F1 (scikit-learn, :mod:`.metrics`), the confusion matrix and every
sample's prediction -- make the report that :func:`write_report` writes
(``xtuner_vitask.inference.exports.evaluate_export`` builds it for an export folder). In ``generate`` mode an answer that does not parse into the label set
is *unparsable*: counted, listed, and scored as wrong (single-label: it matches no class;
multi-label: every label counts as wrong); ``metrics_parsable`` scores the parsable answers alone.
"""
import json
import math
import os
import tempfile

import numpy as np
import torch

from ..errors import VITaskError
from .inputs import check_image_file

MODES = ("rank", "generate")
MULTI_TASK = "multi-task"


# ---------------------------------------------------------------------------------------- data
def task_metas(meta):
    """{task name or None: task meta (label_names, task_type)}: one entry unless the set is merged."""
    if meta.get("task_type") != MULTI_TASK:
        return {None: meta}
    if not meta.get("tasks"):
        raise VITaskError("a multi-task meta.json without 'tasks': regenerate the merged set with merge-sets")
    return dict(meta["tasks"])


def _check_label(record, where, task_meta):
    names, kind = task_meta["label_names"], task_meta["task_type"]
    label = record["label"]
    if not isinstance(label, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in label):
        raise VITaskError(f"{where}: 'label' is {label!r}, not a list of class indices: regenerate the JSONL with "
                          "data_tools")
    bad = [c for c in label if not 0 <= c < len(names)]
    if bad:
        raise VITaskError(f"{where}: label {bad[0]} is outside 0..{len(names) - 1} ({len(names)} classes in "
                          f"meta.json): fix the record or evaluate with the meta.json it was converted with")
    if kind != "multi-label" and len(label) != 1:
        raise VITaskError(f"{where}: a {kind} record needs exactly one label, got {label}: fix the record")


def read_records(data_path, meta, max_samples=None, check_images=True):
    """The labelled records of ``data_path`` (the first ``max_samples``), checked before any model runs.

    Every record needs an ``image`` (one relative path) that opens as an image, a ``label`` in its
    task's range, and (merged sets) a ``task`` of the meta.json. Raises one VITaskError naming the
    record and the fix.
    """
    from ..datasets.classification import read_jsonl

    if max_samples is not None and int(max_samples) < 1:
        raise VITaskError(f"max_samples={max_samples}: use a positive number (or None for every record)")
    if os.path.isdir(data_path):
        raise VITaskError(f"data {data_path} is a folder: pass one of its JSONL files (e.g. "
                          f"{os.path.join(data_path, 'test.jsonl')})")
    records = read_jsonl(data_path)
    if not records:
        raise VITaskError(f"{data_path} has no records: evaluate a non-empty split")
    records = records[:max_samples] if max_samples else records
    tasks = task_metas(meta)
    folder = os.path.dirname(os.path.abspath(data_path))
    for n, record in enumerate(records, 1):
        where = f"{data_path} record {n} (id {record.get('id')!r})" if isinstance(record, dict) else \
            f"{data_path} record {n}"
        if not isinstance(record, dict) or "label" not in record or "image" not in record:
            raise VITaskError(f"{where} has no 'label'/'image': evaluation needs labelled images (convert the data "
                              "with data_tools)")
        image = record["image"]
        if not isinstance(image, str) or not image:
            raise VITaskError(f"{where}: 'image' is {type(image).__name__} {image!r}, not one image path: "
                              "evaluation takes one image per record (split multi-image records)")
        task = record.get("task") if None not in tasks else None
        if task not in tasks:
            raise VITaskError(f"{where} has task {task!r}, not one of the set's tasks {sorted(tasks)}: evaluate "
                              "with the merged set's meta.json")
        _check_label(record, where, tasks[task])
        if check_images:
            check_image_file(os.path.join(folder, image), hint=f"fix {where} (images live beside the JSONL, "
                                                              "as data_tools writes them)")
    return records


def task_groups(records, meta):
    """[(task name or None, task meta, records of the task)] in the order tasks first appear."""
    tasks, groups = task_metas(meta), {}
    for record in records:
        task = record.get("task") if None not in tasks else None
        groups.setdefault(task, []).append(record)
    return [(task, tasks[task], group) for task, group in groups.items()]


def train_records_beside(data_path, meta):
    """train.jsonl beside an eval file (multi-label candidates: the label combinations seen in training)."""
    from ..datasets.classification import read_jsonl

    kinds = {t["task_type"] for t in task_metas(meta).values()}
    path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "train.jsonl")
    return read_jsonl(path) if "multi-label" in kinds and os.path.isfile(path) else []


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
    from ..data.medmnist import parse_response
    from .generate import default_max_new_tokens, generate_records
    from .ranking import best_labels, candidate_responses, rank_records

    if mode not in MODES:
        raise VITaskError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    out = dict(tasks={}, samples=[])
    for task, task_meta, group in task_groups(records, meta):
        kind, names = task_meta["task_type"], task_meta["label_names"]
        n_cls = len(names)
        candidates = candidate_responses(task_meta, [r for r in train_records if task is None or r.get("task") == task])
        desc = f"{mode} {task or ''}".strip()
        probs = None
        if mode == "rank":
            scores = torch.cat(_run_shard(
                lambda part: list(rank_records(model, inputs, part, image_folder, candidates, use_ep=use_ep,
                                               batch_size=batch_size, exemplars=exemplars, strategy=strategy,
                                               progress=progress, desc=desc).split(1)),
                group, distributed))
            preds = best_labels(scores, candidates)
            answers = [candidates[int(i)][0] for i in scores.argmax(1)]
            if kind != "multi-label":  # one candidate per class, in class order
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
        out["tasks"][task or meta.get("dataset", "task")] = task_report
        for i, record in enumerate(group):
            sample = dict(id=record.get("id"), image=record["image"], task=task, label=truths[i],
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
