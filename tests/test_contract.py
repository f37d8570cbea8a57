"""The data contract (meta.json, JSONL, records) and the instruction/response formats: one clear error per defect."""
import json

import pytest

from xtuner_vitask.contract import (
    MULTI_LABEL, MULTI_TASK, TASK_TYPES, check_labels, iter_jsonl, load_meta, parse_meta, problems_report,
    read_jsonl, record_problems, turns,
)
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.formats import NO_FINDING, format_response, instruction, parse_response

SINGLE = {"dataset": "dermamnist", "task_type": "multi-class", "label_names": ["a", "b", "c"], "modality": "skin",
          "size": 28, "n_channels": 3}
MERGED = {"dataset": "x+y", "task_type": "multi-task", "label_names": ["a", "b", "c", "p", "q"],
          "tasks": {"x": {"offset": 0, "num_classes": 3, "label_names": ["a", "b", "c"], "task_type": "multi-class"},
                    "y": {"offset": 3, "num_classes": 2, "label_names": ["p", "q"], "task_type": "multi-label"}}}


def record(label, task=None, human="<image>\nWhat is it?", image="images/0.png"):
    rec = {"id": "r", "image": image, "label": label,
           "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "a"}]}
    if task:
        rec["task"] = task
    return rec


def test_single_and_merged_meta(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps(SINGLE))
    meta = load_meta(tmp_path)  # a folder holding meta.json
    assert (meta.dataset, meta.task_type, meta.num_classes, meta.multi_task) == ("dermamnist", "multi-class", 3, False)
    assert meta.task("anything") is meta.task() and meta.task().offset == 0 and meta.raw == SINGLE
    merged = parse_meta(MERGED)
    assert merged.multi_task and list(merged.tasks) == ["x", "y"]
    y = merged.task_of({"task": "y"})
    assert (y.offset, y.stop, y.num_classes, y.multi_label, y.label_names) == (3, 5, 2, True, ("p", "q"))
    with pytest.raises(VITaskError, match="task 'z' is not one of .* tasks \\(x, y\\)"):
        merged.task("z")
    assert y.as_dict()["label_names"] == ["p", "q"] and MULTI_LABEL in TASK_TYPES and MULTI_TASK not in TASK_TYPES


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("task_type"), "has no 'task_type'"),
    (lambda m: m.update(task_type="multiclass"), "task_type 'multiclass' is not one of"),
    (lambda m: m.update(label_names=[]), "'label_names' must be a non-empty list"),
    (lambda m: m.update(label_names=["a", "A", "b"]), "label names repeat \\(a\\)"),
    (lambda m: m.update(num_classes=4), "num_classes is 4 but label_names has 3"),
    (lambda m: m.update(dataset=7), "'dataset' must be a name"),
])
def test_single_meta_defects(edit, message):
    meta = json.loads(json.dumps(SINGLE))
    edit(meta)
    with pytest.raises(VITaskError, match=message) as err:
        parse_meta(meta, "m.json")
    assert str(err.value).startswith("m.json") and "\n" not in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("tasks"), "needs 'tasks'"),
    (lambda m: m["tasks"]["y"].update(offset=-1), "task 'y'.*offset must be a class index"),
    (lambda m: m["tasks"]["y"].update(offset=4), "task 'y'.*run past the 5 joint label names"),
    (lambda m: m["tasks"]["y"].update(label_names=["q", "p"]), "task 'y'.*differ from the joint"),
    (lambda m: m["tasks"]["x"].update(task_type="multi-task"), "task 'x'.*task_type 'multi-task' is not"),
])
def test_merged_meta_defects(edit, message):
    meta = json.loads(json.dumps(MERGED))
    edit(meta)
    with pytest.raises(VITaskError, match=message):
        parse_meta(meta, "m.json")


def test_meta_file_errors(tmp_path):
    with pytest.raises(VITaskError, match="meta file .*missing.json does not exist"):
        load_meta(tmp_path / "missing.json")
    (tmp_path / "meta.json").write_text('{"task_type": ')
    with pytest.raises(VITaskError, match="is not JSON \\(line 1"):
        load_meta(tmp_path / "meta.json")
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(VITaskError, match="holds a JSON list, not an object"):
        load_meta(tmp_path / "meta.json")


def test_jsonl_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n[1]\n{"a": 3}\n')
    with pytest.raises(VITaskError, match="train.jsonl line 3 is not JSON"):
        read_jsonl(path)
    problems = []
    assert [line for line, _ in iter_jsonl(path, problems)] == [1, 5]  # blank line 2 skipped
    assert [line for line, _ in problems] == [3, 4] and "not an object" in problems[1][1]
    path.write_text("\n\n")
    with pytest.raises(VITaskError, match="has no records"):
        read_jsonl(path)
    assert read_jsonl(path, allow_empty=True) == []
    with pytest.raises(VITaskError, match="is a folder: pass one of its JSONL files \\(e.g. .*train.jsonl\\)"):
        read_jsonl(tmp_path)
    with pytest.raises(VITaskError, match="data file .*nope.jsonl does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(VITaskError, match="is not UTF-8"):
        read_jsonl(path)


def test_record_problems():
    single, merged = parse_meta(SINGLE), parse_meta(MERGED)
    assert record_problems(record([1]), single, require_label=True, require_image=True) == []
    assert record_problems(record([0, 1], "y"), merged) == []
    cases = [
        (record([1], human="<image><image> twice"), single, "has 2 '<image>'"),
        (record([1], human="no token"), single, "has 0 '<image>'"),
        (record([1], image=None, human="<image> x"), single, "has '<image>' but no 'image'"),
        (record([1], image=["a.png", "b.png"]), single, "'image' must be one path"),
        (record([3]), single, "label 3 is outside dermamnist's classes 0..2"),
        (record([-1]), single, "label -1 is outside"),
        (record([0, 1]), single, "exactly one label"),
        (record(["a"]), single, "not a list of class indices"),
        (record([1], "z"), merged, "task 'z' is not one of"),
        (record([2], "y"), merged, "label 2 is outside y's classes 0..1"),
        ({"id": "r", "image": "x.png"}, single, "needs 'conversations'"),
    ]
    for rec, meta, message in cases:
        problems = record_problems(rec, meta)
        assert len(problems) == 1 and message in problems[0], (rec, problems)
    no_label = record([1])
    del no_label["label"]
    assert record_problems(no_label, single) == []
    assert "has no 'label'" in record_problems(no_label, single, require_label=True)[0]
    no_image = record([1], image=None, human="text only")
    assert record_problems(no_image, single) == []
    assert "has no 'image'" in record_problems(no_image, single, require_image=True)[0]
    assert record_problems({"image": "x.png", "label": [1]}, single, conversations=False) == []
    assert turns(record([1])) == ("<image>\nWhat is it?", "a")
    assert check_labels([], parse_meta(MERGED).task("y")) == []  # no finding


def test_problems_report_caps_the_list():
    text = problems_report("train.jsonl", [(n, f"bad {n}") for n in range(30, 0, -1)], 100, limit=5)
    lines = text.splitlines()
    assert lines[0].startswith("30 of 100 records in train.jsonl cannot be used")
    assert lines[1:6] == [f"  line {n}: bad {n}" for n in range(1, 6)] and lines[6] == "  ... and 25 more"


def test_formats_round_trip_and_errors():
    names = ["atelectasis", "cardiomegaly", "effusion"]
    assert format_response(MULTI_LABEL, names, []) == NO_FINDING
    assert parse_response(MULTI_LABEL, names, format_response(MULTI_LABEL, names, [2, 0])) == [0, 2]
    assert parse_response("binary", ["normal", "pneumonia"], "Pneumonia.") == [1]
    with pytest.raises(VITaskError, match="unknown task type 'multi-task'"):
        parse_response(MULTI_TASK, names, "x")
    assert instruction("CT", ["a", "b"], "incomplete") == "Analyze the given CT image for diagnosis."
    with pytest.raises(VITaskError, match="unknown instruction variant"):
        instruction("CT", ["a"], "short")
