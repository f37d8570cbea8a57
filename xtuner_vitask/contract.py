"""The data contract: what a converted set's ``meta.json`` and JSONL records hold, read and checked once.

A converted set (written by ``data_tools/``) is a folder::

    meta.json                 dataset, task_type, label_names, ... (merged sets: tasks)
    {train,val,test}.jsonl    one record per line: id, image, conversations, label, task
    images/...                the records' ``image`` paths are relative to the folder

Every reader of meta.json goes through :func:`load_meta` (one clear error per defect, a typed
:class:`DataMeta`), every reader of a JSONL through :func:`read_jsonl` / :func:`iter_jsonl`
(a broken line is reported with its own line number). Record-level checks that need no model
(turns, one ``<image>``, labels in range for the record's task) are :func:`record_problems`.

Importing this module is cheap (standard library only).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator

from xtuner_vitask.errors import VITaskError

# Task types: the four kinds of single sets, and the kind of a merged set.
MULTI_CLASS = "multi-class"
BINARY = "binary"
MULTI_LABEL = "multi-label"
ORDINAL = "ordinal"
MULTI_TASK = "multi-task"
TASK_TYPES = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)
SINGLE_LABEL_TYPES = (MULTI_CLASS, BINARY, ORDINAL)

META_FILE = "meta.json"
SPLITS = ("train", "val", "test")
IMAGE_TOKEN = "<image>"  # the image placeholder in a record's human turn (XTuner's DEFAULT_IMAGE_TOKEN)


def check_task_type(task_type, where: str = "task_type") -> str:
    """``task_type`` if it is one of :data:`TASK_TYPES`, else VITaskError listing them."""
    if task_type not in TASK_TYPES:
        raise VITaskError(f"{where}: unknown task type {task_type!r}: choose one of {', '.join(TASK_TYPES)}")
    return task_type


class LabelSlice:
    """Where a task's classes sit in a (joint) label space, for classes with ``offset``, ``num_classes`` and
    ``task_type`` (TaskMeta here, the TSM's head slices in tsm/model.py)."""

    @property
    def multi_label(self) -> bool:
        return self.task_type == MULTI_LABEL

    @property
    def stop(self) -> int:
        return self.offset + self.num_classes


@dataclass(frozen=True)
class TaskMeta(LabelSlice):
    """One task's label space: a single set, or one slice of a merged set's joint label space."""

    name: str
    task_type: str
    label_names: tuple
    offset: int = 0  # first index of this task's classes in the joint label space (0 for a single set)
    modality: str | None = None
    size: int | None = None
    n_channels: int | None = None
    instruction_variant: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def as_dict(self) -> dict:
        """The shape of one entry of a merged meta.json's ``tasks``."""
        return {"offset": self.offset, "num_classes": self.num_classes, "label_names": list(self.label_names),
                "task_type": self.task_type, "modality": self.modality, "size": self.size,
                "n_channels": self.n_channels, "instruction_variant": self.instruction_variant}


@dataclass(frozen=True)
class DataMeta:
    """A validated meta.json. ``tasks`` has one entry for a single set (its ``dataset`` name) and
    one per merged set for a ``multi-task`` set; ``raw`` is the file's content as written."""

    path: str | None
    dataset: str
    task_type: str
    label_names: tuple
    tasks: dict = field(compare=False)
    raw: dict = field(compare=False, repr=False)

    @property
    def multi_task(self) -> bool:
        return self.task_type == MULTI_TASK

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def where(self) -> str:
        return self.path or META_FILE

    def task(self, name: str | None = None) -> TaskMeta:
        """The task called ``name``; a single set answers every name (its records all belong to it)."""
        if not self.multi_task:
            return next(iter(self.tasks.values()))
        if name not in self.tasks:
            raise VITaskError(f"task {name!r} is not one of {self.where}'s tasks ({', '.join(self.tasks)}): "
                              "use the merged set's meta.json")
        return self.tasks[name]

    def task_of(self, record: dict) -> TaskMeta:
        """The task a record belongs to (its ``task`` in a merged set)."""
        return self.task(record.get("task") if isinstance(record, dict) else None)


def _defect(where: str, text: str) -> VITaskError:
    return VITaskError(f"{where}: {text}; regenerate it with data_tools (or fix that key)")


def _label_names(value, where: str, key: str) -> tuple:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) and n.strip() for n in value):
        raise _defect(where, f"'{key}' must be a non-empty list of names, got {_short(value)}")
    return tuple(value)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _single_task(name: str, spec: dict, where: str, offset: int = 0) -> TaskMeta:
    kind = spec.get("task_type")
    if kind not in TASK_TYPES:
        raise _defect(where, f"task_type {kind!r} is not one of {', '.join(TASK_TYPES + (MULTI_TASK,))}")
    names = _label_names(spec.get("label_names"), where, "label_names")
    lowered = [" ".join(n.split()).lower() for n in names]
    repeated = sorted({n for n in lowered if lowered.count(n) > 1})
    if repeated:  # responses are parsed back to label names case-insensitively
        raise _defect(where, f"label names repeat ({', '.join(repeated)})")
    if "num_classes" in spec and spec["num_classes"] != len(names):
        raise _defect(where, f"num_classes is {spec['num_classes']!r} but label_names has {len(names)} names")
    return TaskMeta(name=name, task_type=kind, label_names=names, offset=offset, modality=spec.get("modality"),
                    size=spec.get("size"), n_channels=spec.get("n_channels"),
                    instruction_variant=spec.get("instruction_variant"))


def parse_meta(raw, where: str = META_FILE) -> DataMeta:
    """Validate a meta.json's content (a dict); raises VITaskError naming the first defect."""
    if not isinstance(raw, dict):
        raise _defect(where, f"it holds a JSON {type(raw).__name__}, not an object")
    for key in ("task_type", "label_names"):
        if key not in raw:
            raise _defect(where, f"it has no '{key}'")
    dataset = raw.get("dataset", "data")
    if not isinstance(dataset, str) or not dataset:
        raise _defect(where, f"'dataset' must be a name, got {_short(dataset)}")
    if raw["task_type"] != MULTI_TASK:
        task = _single_task(dataset, raw, where)
        return DataMeta(path=where if where != META_FILE else None, dataset=dataset, task_type=task.task_type,
                        label_names=task.label_names, tasks={dataset: task}, raw=raw)

    joint = _label_names(raw["label_names"], where, "label_names")
    specs = raw.get("tasks")
    if not isinstance(specs, dict) or not specs:
        raise _defect(where, "a multi-task meta.json needs 'tasks' ({name: {offset, num_classes, task_type, "
                             "label_names}})")
    if "num_classes" in raw and raw["num_classes"] != len(joint):
        raise _defect(where, f"num_classes is {raw['num_classes']!r} but label_names has {len(joint)} names")
    tasks = {}
    for name, spec in specs.items():
        here = f"{where} task {name!r}"
        if not isinstance(spec, dict):
            raise _defect(here, "it is not an object")
        offset = spec.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise _defect(here, f"offset must be a class index >= 0, got {_short(offset)}")
        if "label_names" not in spec and isinstance(spec.get("num_classes"), int):
            spec = dict(spec, label_names=list(joint[offset:offset + spec["num_classes"]]))
        task = _single_task(name, spec, here, offset)
        if task.stop > len(joint):
            raise _defect(here, f"classes {offset}..{task.stop - 1} run past the {len(joint)} joint label names")
        if tuple(joint[offset:task.stop]) != task.label_names:
            raise _defect(here, f"label_names differ from the joint label_names[{offset}:{task.stop}]")
        tasks[name] = task
    return DataMeta(path=where if where != META_FILE else None, dataset=dataset, task_type=MULTI_TASK,
                    label_names=joint, tasks=tasks, raw=raw)


def meta_path_of(path) -> str:
    """``path`` itself, or ``path/meta.json`` when ``path`` is a folder."""
    path = os.fspath(path)
    return os.path.join(path, META_FILE) if os.path.isdir(path) else path


def meta_beside(data_path) -> str:
    """The meta.json beside a JSONL (where data_tools writes it)."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(data_path))), META_FILE)


def load_meta(path) -> DataMeta:
    """Read and validate a meta.json (a file, or a folder holding one)."""
    path = meta_path_of(path)
    if not os.path.isfile(path):
        raise VITaskError(f"meta file {path} does not exist: data_tools writes it beside the JSONL files "
                          "(pass a converted set's folder or meta.json)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as exc:
        raise VITaskError(f"{path} is not JSON (line {exc.lineno}: {exc.msg}): regenerate it with data_tools") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VITaskError(f"cannot read {path} ({exc}): regenerate it with data_tools") from None
    return parse_meta(raw, path)


# ----------------------------------------------------------------------------------------- JSONL
def _check_data_file(path: str) -> None:
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith((".jsonl", ".json")) and f != META_FILE)
        hint = f"e.g. {os.path.join(path, inside[0])}" if inside else "no JSONL is in it"
        raise VITaskError(f"{path} is a folder: pass one of its JSONL files ({hint})")
    if not os.path.isfile(path):
        raise VITaskError(f"data file {path} does not exist: pass a JSONL written by data_tools")


def iter_jsonl(path, problems: list | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a JSONL file.

    A line that is not JSON, or not a JSON object, raises VITaskError naming its line number; with
    a ``problems`` list it is appended there as ``(line, message)`` instead and reading goes on.
    """
    path = os.fspath(path)
    _check_data_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    message = f"not JSON ({exc.msg} at column {exc.colno})"
                else:
                    if isinstance(record, dict):
                        yield number, record
                        continue
                    message = f"a JSON {type(record).__name__}, not an object (one record per line)"
                if problems is None:
                    raise VITaskError(f"{path} line {number} is {message}: fix or remove that line")
                problems.append((number, message))
    except UnicodeDecodeError as exc:
        raise VITaskError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                          "pass a JSONL written by data_tools") from None


def read_jsonl(path, allow_empty: bool = False) -> list[dict]:
    """All records of a JSONL file (see :func:`iter_jsonl`); an empty file is an error unless ``allow_empty``."""
    records = [record for _, record in iter_jsonl(path)]
    if not records and not allow_empty:
        raise VITaskError(f"{os.fspath(path)} has no records: convert a non-empty split with data_tools")
    return records


def write_jsonl(path, records) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept readable)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------- records
def turns(record: dict) -> tuple[str, str]:
    """``(human, gpt)``: the first instruction and the first response of a record's conversations."""
    conversations = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conversations, list):
        raise VITaskError(f"record {record_id(record)} has no 'conversations' list (XTuner's InternVL format)")
    human = next((t.get("value") for t in conversations if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in conversations if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(human, str) or not isinstance(gpt, str):
        raise VITaskError(f"record {record_id(record)} needs a 'human' and a 'gpt' turn with text values")
    return human, gpt


def record_id(record, default="?") -> str:
    return str(record.get("id", default)) if isinstance(record, dict) else default


def record_image(record: dict):
    """The record's image path, or None. XTuner accepts a one-element list too."""
    image = record.get("image")
    if isinstance(image, (list, tuple)) and len(image) == 1:
        image = image[0]
    return image


def check_labels(labels, task: TaskMeta) -> list[int]:
    """The record's ``label`` as a list of class indices of ``task``, or VITaskError saying what is wrong."""
    if not isinstance(labels, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in labels):
        raise VITaskError(f"label {_short(labels)} is not a list of class indices")
    bad = [i for i in labels if not 0 <= i < task.num_classes]
    if bad:
        raise VITaskError(f"label {bad[0]} is outside {task.name}'s classes 0..{task.num_classes - 1}")
    if not task.multi_label and len(labels) != 1:
        raise VITaskError(f"a {task.task_type} record has exactly one label, got {labels}")
    if task.multi_label and len(set(labels)) != len(labels):
        raise VITaskError(f"label {labels} repeats a finding")
    return labels


def record_problems(record: dict, meta: DataMeta | None = None, require_label: bool = False,
                    require_image: bool = False, conversations: bool = True) -> list[str]:
    """What is wrong with one record, without reading its image or tokenizing it (empty = nothing).

    Checks: an ``image`` path (a string) when ``require_image``; with ``conversations``, a human
    and a gpt turn and exactly one ``<image>`` in the human turns when there is an image (none
    without); a ``label`` when ``require_label``; with ``meta``, the ``task`` (merged sets) and the
    labels in range for that task.
    """
    problems = []
    image = record_image(record)
    if image is not None and not isinstance(image, str):
        problems.append(f"'image' must be one path, got {_short(record.get('image'))}")
    elif image is None and require_image:
        problems.append("has no 'image': every record needs one here")
    if conversations:
        try:
            turns(record)
        except VITaskError:
            problems.append("needs 'conversations' with a 'human' and a 'gpt' turn (XTuner's InternVL format)")
        else:
            tokens = sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"]
                         if isinstance(t, dict) and t.get("from") == "human" and isinstance(t.get("value"), str))
            if image is not None and tokens != 1:
                problems.append(f"has {tokens} '{IMAGE_TOKEN}' in its instruction; one image needs exactly one")
            elif image is None and tokens:
                problems.append(f"has '{IMAGE_TOKEN}' but no 'image'")
    if "label" not in record:
        if require_label:
            problems.append("has no 'label' (the class of every record is needed; convert with data_tools)")
        return problems
    if meta is not None:
        try:
            task = meta.task_of(record)
        except VITaskError:
            problems.append(f"task {record.get('task')!r} is not one of {meta.where}'s tasks "
                            f"({', '.join(meta.tasks)})")
            return problems
        try:
            check_labels(record["label"], task)
        except VITaskError as exc:
            problems.append(str(exc))
    return problems


def problems_report(path, problems: list, total: int, limit: int = 20) -> str:
    """One message for the ``(line, problem)`` pairs of a file (one per bad record): the count, then
    the first ``limit`` of them by line number."""
    problems = sorted(problems, key=lambda p: p[0])
    lines = [f"{len(problems)} of {total} records in {os.fspath(path)} cannot be used (fix or remove them):"]
    lines += [f"  line {line}: {text}" for line, text in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
