"""data_tools: MedMNIST / external sets -> XTuner InternVL instruction data (issue 3).

Small npz files in medmnist's exact layout are generated here (no download); the real label names,
task types, channel counts and MD5s come from the installed ``medmnist.INFO``.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmnist.info import INFO
from xtuner_vitask.data import convert_external, convert_medmnist, merge_sets
from xtuner_vitask.data.medmnist import MEDMNIST_2D_FLAGS, MODALITY, dataset_info, label_names, task_type
from xtuner_vitask.formats import NO_FINDING, format_response, instruction, parse_response
from xtuner_vitask.data.npz import SplitSizeWarning, npz_filename
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::xtuner_vitask.data.npz.SplitSizeWarning")

# one set per response format: multi-class, binary, multi-label, ordinal
FOUR_SETS = {"dermamnist": "multi-class", "pneumoniamnist": "binary", "chestmnist": "multi-label",
             "retinamnist": "ordinal"}
COUNTS = (120, 30, 40)


@pytest.fixture(scope="module")
def npz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("medmnist")
    for seed, flag in enumerate(list(FOUR_SETS) + ["organamnist", "organcmnist"]):
        write_medmnist_npz(root / npz_filename(flag, 28), flag, COUNTS, seed=seed)
    return root


@pytest.fixture(scope="module")
def converted(npz_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return {flag: convert_medmnist(flag, 28, out / flag, root=npz_root, progress=False)
            for flag in list(FOUR_SETS) + ["organamnist", "organcmnist"]}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def leftovers(parent, name):
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(name))


# ---------------------------------------------------------------- formats from medmnist.INFO

def test_twelve_flags_and_label_names_come_from_medmnist_info():
    assert len(MEDMNIST_2D_FLAGS) == 12 and set(MODALITY) == set(MEDMNIST_2D_FLAGS)
    readable = {"pleural": "pleural thickening", "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)":
                    "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)"}
    medmnist_task = {"multi-class": "multi-class", "binary-class": "binary",
                     "multi-label, binary-class": "multi-label", "ordinal-regression": "ordinal"}
    for flag in MEDMNIST_2D_FLAGS:
        raw = [INFO[flag]["label"][str(i)] for i in range(len(INFO[flag]["label"]))]
        names = label_names(flag)
        assert len(names) == len(raw) == len(set(names))
        assert task_type(flag) == medmnist_task[INFO[flag]["task"]]
        assert dataset_info(flag) is INFO[flag]
        for name, original in zip(names, raw):
            if flag == "retinamnist":
                assert name.endswith(f"(grade {original})")
            elif original.endswith(("-left", "-right")):  # "kidney-left" -> "left kidney"
                assert name == " ".join(original.split("-")[::-1])
            else:
                assert name == readable.get(original, original.lower())
    assert label_names("dermamnist")[5] == "melanocytic nevi"
    assert sum(len(label_names(f)) for f in MEDMNIST_2D_FLAGS if f not in ("organcmnist", "organsmnist")) == 70


def test_unknown_flag_lists_valid_ones():
    with pytest.raises(VITaskError, match="choose one of pathmnist.*organsmnist"):
        dataset_info("dermamnist3d")


def test_instruction_variants():
    names = label_names("dermamnist")
    full = instruction("dermatoscope", names)
    assert full == ("Analyze the given dermatoscope image for diagnosis. The possible diagnoses are: "
                    + ", ".join(names) + ".")
    assert instruction("dermatoscope", names, "incomplete") == "Analyze the given dermatoscope image for diagnosis."
    with pytest.raises(VITaskError, match="instruction variant"):
        instruction("dermatoscope", names, "partial")


@pytest.mark.parametrize("flag", MEDMNIST_2D_FLAGS)
def test_every_response_parses_back(flag):
    kind, names = task_type(flag), label_names(flag)
    cases = [[i] for i in range(len(names))]
    if kind == "multi-label":
        rng = np.random.default_rng(0)
        cases += [[]] + [sorted(rng.choice(len(names), k, replace=False).tolist()) for k in (2, 3, 5)]
    for labels in cases:
        text = format_response(kind, names, labels)
        assert parse_response(kind, names, text) == labels
        assert parse_response(kind, names, "  " + text.upper().replace(" ", "  ") + ". ") == labels


def test_response_formats_per_task_type():
    chest = label_names("chestmnist")
    assert format_response("multi-label", chest, []) == NO_FINDING
    assert format_response("multi-label", chest, [3, 2]) == "effusion, infiltration"
    assert parse_response("multi-label", chest, "no finding.") == []
    assert parse_response("multi-label", chest, "Effusion ,infiltration") == [2, 3]
    for unparsable in ("infiltration, effusion", "effusion, effusion", "effusion and mass", "", "edema, "):
        assert parse_response("multi-label", chest, unparsable) is None
    retina = label_names("retinamnist")
    assert format_response("ordinal", retina, [2]) == "moderate diabetic retinopathy (grade 2)"
    assert parse_response("ordinal", retina, "2") is None
    breast = label_names("breastmnist")
    assert parse_response("binary", breast, "Normal, benign.") == [1]
    assert parse_response("multi-class", label_names("dermamnist"), "melanoma or nevi") is None
    with pytest.raises(VITaskError):
        format_response("multi-class", breast, [0, 1])


# ---------------------------------------------------------------- generated npz

@pytest.mark.parametrize("flag", list(FOUR_SETS))
def test_generated_npz_has_medmnist_layout(npz_root, flag):
    data = np.load(npz_root / npz_filename(flag, 28))
    assert sorted(data.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
    n_classes = len(INFO[flag]["label"])
    for split, n in zip(("train", "val", "test"), COUNTS):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        channels = () if INFO[flag]["n_channels"] == 1 else (3,)
        assert images.dtype == np.uint8 and images.shape == (n, 28, 28) + channels
        assert labels.shape == (n, n_classes if flag == "chestmnist" else 1)
        per_class = labels.sum(0) if flag == "chestmnist" else np.bincount(labels[:, 0], minlength=n_classes)
        assert (per_class > 0).all()  # every class in every split
    train = data["train_labels"]
    if flag != "chestmnist":
        counts = np.bincount(train[:, 0])
        assert counts.max() > counts.min()  # mildly imbalanced, like real data


def test_generated_classes_are_visually_recoverable(tmp_path):
    """Per-class gratings: a nearest-centroid on FFT magnitudes separates classes well above chance."""
    path = write_medmnist_npz(tmp_path / "dermamnist.npz", "dermamnist", (700, 10, 350), seed=3)
    data = np.load(path)

    def spectrum(images):
        gray = images.astype(np.float32).mean(-1)
        gray -= gray.mean((1, 2), keepdims=True)
        return np.log1p(np.abs(np.fft.rfft2(gray))).reshape(len(gray), -1)

    x_train, y_train = spectrum(data["train_images"]), data["train_labels"][:, 0]
    x_test, y_test = spectrum(data["test_images"]), data["test_labels"][:, 0]
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(7)])
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (predicted == y_test).mean() > 0.6  # chance is ~0.2
    # the class is not in global colour: mean colour per class is about the same
    means = np.stack([data["train_images"][y_train == c].mean((0, 1, 2)) for c in range(7)])
    assert np.ptp(means, 0).max() < 12


# ---------------------------------------------------------------- conversion

@pytest.mark.parametrize("flag", list(FOUR_SETS))
def test_converted_records_match_npz(npz_root, converted, flag):
    out = converted[flag]
    data = np.load(npz_root / npz_filename(flag, 28))
    meta = json.loads((out / "meta.json").read_text())
    names = label_names(flag)
    assert meta["dataset"] == flag and meta["task_type"] == FOUR_SETS[flag]
    assert meta["label_names"] == names and meta["modality"] == MODALITY[flag]
    assert meta["size"] == 28 and meta["n_channels"] == INFO[flag]["n_channels"]
    assert meta["instruction_variant"] == "complete" and meta["generated"]["flag"] == flag
    assert len(meta["source"]["md5"]) == 32 and meta["source"]["md5_matches_medmnist"] is False
    human = "<image>\n" + instruction(MODALITY[flag], names)
    for split, n in zip(("train", "val", "test"), COUNTS):
        records = read_jsonl(out / f"{split}.jsonl")
        assert len(records) == n == meta["counts"][split]["total"]
        per_class = np.zeros(len(names), int)
        for index, record in enumerate(records):
            assert record["id"] == f"{flag}/{split}/{index:05d}"
            assert record["image"] == f"images/{split}/{index:05d}.png" and record["task"] == flag
            row = data[f"{split}_labels"][index]
            expected = np.flatnonzero(row).tolist() if flag == "chestmnist" else [int(row[0])]
            assert record["label"] == expected
            per_class[expected] += 1
            human_turn, gpt_turn = record["conversations"]
            assert human_turn == {"from": "human", "value": human}
            assert gpt_turn == {"from": "gpt", "value": format_response(FOUR_SETS[flag], names, expected)}
            assert parse_response(FOUR_SETS[flag], names, gpt_turn["value"]) == expected
        assert meta["counts"][split]["per_class"] == per_class.tolist()
        for index in (0, n - 1):  # PNG pixels are the npz's
            png = np.asarray(Image.open(out / "images" / split / f"{index:05d}.png"))
            assert np.array_equal(png, data[f"{split}_images"][index])
    if flag == "chestmnist":
        responses = {r["conversations"][1]["value"] for r in read_jsonl(out / "train.jsonl")}
        assert NO_FINDING in responses and any(", " in r for r in responses)


def test_incomplete_instruction_variant(npz_root, tmp_path):
    out = convert_medmnist("dermamnist", 28, tmp_path / "o", root=npz_root, instruction_variant="incomplete",
                           limit_per_split=10, progress=False)
    record = read_jsonl(out / "test.jsonl")[0]
    assert record["conversations"][0]["value"] == "<image>\nAnalyze the given dermatoscope image for diagnosis."
    assert json.loads((out / "meta.json").read_text())["instruction_variant"] == "incomplete"


def test_stratified_seeded_sampling(npz_root, tmp_path):
    def ids(out, split="train"):
        return [r["id"] for r in read_jsonl(out / f"{split}.jsonl")]

    kwargs = dict(root=npz_root, limit_per_split=28, progress=False, workers=1)
    a = convert_medmnist("dermamnist", 28, tmp_path / "a", seed=1, **kwargs)
    b = convert_medmnist("dermamnist", 28, tmp_path / "b", seed=1, **kwargs)
    c = convert_medmnist("dermamnist", 28, tmp_path / "c", seed=2, **kwargs)
    assert ids(a) == ids(b) != ids(c)
    full = np.bincount(np.load(npz_root / "dermamnist.npz")["train_labels"][:, 0], minlength=7)
    kept = np.array(json.loads((a / "meta.json").read_text())["counts"]["train"]["per_class"])
    assert kept.sum() == 28 and (kept >= 1).all()
    assert np.abs(kept - full * 28 / full.sum()).max() <= 1.5  # proportional to the full split
    assert len(ids(a, "val")) == 28  # val has 30 images
    for record in read_jsonl(a / "train.jsonl"):  # file names keep the npz index
        assert (a / record["image"]).is_file()
    half = convert_medmnist("chestmnist", 28, tmp_path / "f", root=npz_root, fraction=0.5, progress=False)
    meta = json.loads((half / "meta.json").read_text())
    assert [meta["counts"][s]["total"] for s in ("train", "val", "test")] == [60, 15, 20]


def test_force_replaces_and_existing_out_is_refused(npz_root, tmp_path):
    out = tmp_path / "o"
    convert_medmnist("pneumoniamnist", 28, out, root=npz_root, limit_per_split=5, progress=False)
    with pytest.raises(VITaskError, match="already exists.*--force"):
        convert_medmnist("pneumoniamnist", 28, out, root=npz_root, progress=False)
    convert_medmnist("pneumoniamnist", 28, out, root=npz_root, limit_per_split=7, force=True, progress=False)
    assert len(read_jsonl(out / "train.jsonl")) == 7
    assert leftovers(tmp_path, "o") == ["o"]


def test_split_size_differing_from_info_warns(npz_root, tmp_path):
    with pytest.warns(SplitSizeWarning, match="differ from medmnist.INFO"):
        convert_medmnist("retinamnist", 28, tmp_path / "o", root=npz_root, limit_per_split=5, progress=False)


def test_failure_while_writing_leaves_nothing(npz_root, tmp_path, monkeypatch):
    import xtuner_vitask.data.convert as convert_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "write_jsonl", broken)
    with pytest.raises(OSError):
        convert_medmnist("dermamnist", 28, tmp_path / "o", root=npz_root, progress=False)
    assert leftovers(tmp_path, "o") == []


# ---------------------------------------------------------------- bad input

def _rewrite(source, target, edit):
    arrays = dict(np.load(source))
    edit(arrays)
    with open(target, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _set(key, make):
    def edit(arrays):
        arrays[key] = make(arrays)
    return edit


BAD_NPZ = {
    "missing split key": ("dermamnist", lambda a: a.pop("val_labels"), "no 'val_labels' array"),
    "lengths differ": ("dermamnist", _set("test_labels", lambda a: a["test_labels"][:-3]),
                       "40 images but 37 labels"),
    "label outside classes": ("dermamnist", _set("train_labels", lambda a: np.where(
        np.arange(len(a["train_labels"]))[:, None] == 5, 7, a["train_labels"]).astype(np.uint8)),
        "row 5 is 7, outside dermamnist's classes 0..6"),
    "multi-label not 0/1": ("chestmnist", _set("val_labels", lambda a: a["val_labels"] * 2),
                            "expected a 0/1 vector"),
    "wrong channel count": ("dermamnist", _set("train_images", lambda a: a["train_images"][..., 0]),
                            "expected RGB N x H x W x 3"),
    "grayscale set given RGB": ("pneumoniamnist", _set("val_images", lambda a: np.repeat(
        a["val_images"][..., None], 3, -1)), "expected grayscale N x H x W"),
    "wrong image dtype": ("dermamnist", _set("test_images", lambda a: a["test_images"].astype(np.float32)),
                          "dtype float32, expected uint8"),
    "wrong label dtype": ("retinamnist", _set("test_labels", lambda a: a["test_labels"].astype(np.float64)),
                          "expected integers"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_one_clear_error_and_nothing_written(npz_root, tmp_path, case):
    flag, edit, message = BAD_NPZ[case]
    root = tmp_path / "root"
    root.mkdir()
    _rewrite(npz_root / npz_filename(flag, 28), root / npz_filename(flag, 28), edit)
    with pytest.raises(VITaskError) as error:
        convert_medmnist(flag, 28, tmp_path / "out", root=root, progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(flag="dermamnist", size=28, root="MISSING"), "MedMNIST file not found"),
    (dict(flag="dermamnist", size=64), "dermamnist_64.npz"),
    (dict(flag="nodulemnist3d", size=28), "unknown MedMNIST 2D data set 'nodulemnist3d'"),
    (dict(flag="dermamnist", size=32), "unsupported MedMNIST image size 32"),
    (dict(flag="dermamnist", size=28, verify=True), "MD5 mismatch"),
    (dict(flag="dermamnist", size=28, limit_per_split=5, fraction=0.1), "not both"),
    (dict(flag="dermamnist", size=28, fraction=1.5), "--fraction"),
])
def test_bad_arguments(npz_root, tmp_path, kwargs, message):
    kwargs.setdefault("root", npz_root)
    if kwargs["root"] == "MISSING":
        kwargs["root"] = tmp_path / "nowhere"
    with pytest.raises(VITaskError, match=message) as error:
        convert_medmnist(out_dir=tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path, "out") == []


def test_script_exit_code_and_single_error_line(npz_root, tmp_path):
    script = REPO / "data_tools" / "medmnist_to_xtuner.py"
    bad = subprocess.run([sys.executable, str(script), "--flag", "dermamnist", "--root", str(npz_root),
                          "--out", str(tmp_path / "out"), "--verify"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MD5 mismatch" in errors[0] and "Traceback" not in bad.stderr
    assert leftovers(tmp_path, "out") == []
    good = subprocess.run([sys.executable, str(script), "--flag", "breastmnist", "--npz",
                           str(write_medmnist_npz(tmp_path / "b.npz", "breastmnist", (20, 5, 5))),
                           "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert good.returncode == 0, good.stderr
    assert "warning: " in good.stderr and len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 20


# ---------------------------------------------------------------- external CSV

def _external_set(tmp_path, rows, sizes=((40, 30), (33, 33))):
    images = tmp_path / "ext_images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (name, _) in enumerate(rows):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / (name + ".jpg"))
    csv_path = tmp_path / "aptos.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id_code", "diagnosis"])
        writer.writerows(rows)
    return images, csv_path


def test_external_csv_onto_retina_labels(converted, tmp_path):
    rows = [("a1", "0"), ("b2", "4"), ("c3", "Moderate diabetic retinopathy (grade 2)"), ("d4", "1")]
    images, csv_path = _external_set(tmp_path, rows)
    out = convert_external(images, csv_path, converted["retinamnist"] / "meta.json", tmp_path / "aptos",
                           image_column="id_code", label_column="diagnosis", progress=False)
    records = read_jsonl(out / "test.jsonl")
    names = label_names("retinamnist")
    assert [r["label"] for r in records] == [[0], [4], [2], [1]]
    assert [r["conversations"][1]["value"] for r in records] == [names[0], names[4], names[2], names[1]]
    assert records[0]["conversations"][0]["value"] == "<image>\n" + instruction("fundus", names)
    assert records[0]["task"] == "retinamnist" and records[0]["id"] == "aptos/test/00000"
    for record in records:
        with Image.open(out / record["image"]) as image:
            assert image.size == (28, 28) and image.mode == "RGB"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["label_names"] == names and meta["counts"]["test"]["per_class"] == [1, 1, 1, 0, 1]
    assert meta["external"]["name"] == "aptos"


@pytest.mark.parametrize("rows, message", [
    ([("a1", "0"), ("zz", "1")], "line 3: image 'zz' not found"),
    ([("a1", "0"), ("b2", "grade 9")], "line 3: unknown label 'grade 9'"),
    ([("a1", "5")], "unknown label '5'"),
])
def test_external_bad_rows(converted, tmp_path, rows, message):
    images, csv_path = _external_set(tmp_path, [r for r in rows if r[0] != "zz"])
    if any(r[0] == "zz" for r in rows):
        with open(csv_path, "a", newline="") as handle:
            csv.writer(handle).writerow(["zz", "1"])
    with pytest.raises(VITaskError, match=message):
        convert_external(images, csv_path, converted["retinamnist"], tmp_path / "ext", image_column="id_code",
                         label_column="diagnosis", progress=False)
    assert leftovers(tmp_path, "ext") == ["ext_images"]


def test_external_script_error(converted, tmp_path):
    images, csv_path = _external_set(tmp_path, [("a1", "0")])
    result = subprocess.run([sys.executable, str(REPO / "data_tools" / "external_to_xtuner.py"), "--images",
                             str(images), "--csv", str(csv_path), "--meta", str(converted["retinamnist"]),
                             "--out", str(tmp_path / "ext")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "no 'image' column" in result.stderr


# ---------------------------------------------------------------- merge

def test_merge_joint_label_space(converted, tmp_path):
    order = ["dermamnist", "chestmnist", "organamnist", "organcmnist", "pneumoniamnist"]
    out = merge_sets([converted[f] for f in order], tmp_path / "merged", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task_type"] == "multi-task"
    sizes = [len(label_names(f)) for f in order]
    assert [meta["tasks"][f]["offset"] for f in order] == [0, 7, 21, 21, 32]  # organ A/C share a slice
    assert meta["num_classes"] == len(meta["label_names"]) == 7 + 14 + 11 + 2 == sum(sizes) - 11
    for flag in order:
        task = meta["tasks"][flag]
        joint = meta["label_names"][task["offset"]:task["offset"] + task["num_classes"]]
        assert joint == label_names(flag) == task["label_names"]
        assert task["task_type"] == task_type(flag)
    records = read_jsonl(out / "train.jsonl")
    assert len(records) == COUNTS[0] * len(order) == meta["counts"]["train"]["total"]
    for record in records[::37]:
        original = next(r for r in read_jsonl(converted[record["task"]] / "train.jsonl") if r["id"] == record["id"])
        assert record["label"] == original["label"]
        assert record["conversations"] == original["conversations"]
        assert (out / record["image"]).read_bytes() == (converted[record["task"]] / original["image"]).read_bytes()
    unshared = merge_sets([converted["organamnist"], converted["organcmnist"]], tmp_path / "m2",
                          share_identical=False, progress=False)
    assert json.loads((unshared / "meta.json").read_text())["num_classes"] == 22


def test_merge_refuses_duplicates(converted, tmp_path):
    with pytest.raises(VITaskError, match="given twice"):
        merge_sets([converted["dermamnist"], converted["dermamnist"]], tmp_path / "m", progress=False)
    assert leftovers(tmp_path, "m") == []


def test_registered_cli_subcommands(npz_root, tmp_path, capsys):
    from xtuner_vitask.cli import convert
    from xtuner_vitask.cli.main import main

    assert main(["convert-medmnist", "--flag", "pneumoniamnist", "--root", str(npz_root), "--out",
                 str(tmp_path / "o"), "--limit-per-split", "4", "--no-progress"]) == 0
    assert len(read_jsonl(tmp_path / "o" / "val.jsonl")) == 4
    capsys.readouterr()
    assert main(["merge-sets", str(tmp_path / "o"), str(npz_root), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "meta.json does not exist" in err and not (tmp_path / "m").exists()
    assert set(convert.COMMANDS) == {"convert-medmnist", "convert-external", "merge-sets"}
    assert not hasattr(convert, "add_arguments")  # the unregistered nested `convert` subcommand is gone
