"""Task-specific model (TSM): loss masking, features, checkpoints, configs, exemplar cache, training.

Fast tests write the data contract directly (a few dozen PNGs + JSONL + meta.json); the slow
end-to-end test generates a MedMNIST-layout npz, converts it with data_tools and trains the tiny
TSM through XTuner's real train tool.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xtuner_vitask.errors import VITaskError
from xtuner_vitask.tsm.checkpoint import check_tsm_matches_meta, load_tsm, read_tsm_identity, tsm_checksum
from xtuner_vitask.tsm.dataset import ImageClassificationDataset, build_tsm_transform, tsm_collate
from xtuner_vitask.tsm.exemplar_cache import ExemplarCache, build_exemplar_cache
from xtuner_vitask.tsm.model import TaskSlice, TaskSpecificModel, classes_from_meta, task_restricted_loss

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / "configs" / "tsm_tiny_cpu.py"
TINY = dict(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(patch_size=4, depth=2))
PALETTE = [(250, 40, 40), (40, 250, 40), (40, 40, 250), (250, 250, 40), (250, 40, 250), (40, 250, 250)]


# ----------------------------------------------------------------------------- data fixtures
def _blob_image(rng, cells, size=28):
    """Noise with one coloured square per present class (a pattern a tiny ViT learns at once)."""
    img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
    step = size // 3
    for c in cells:
        row, col = divmod(c, 3)
        y, x = row * step + rng.integers(0, 3), col * step + rng.integers(0, 3)
        img[y:y + step - 3, x:x + step - 3] = PALETTE[c % len(PALETTE)]
    return img


def write_contract_set(out, flag="dermamnist", task_type="multi-class", num_classes=3,
                       n_per_split=(12, 6, 6), seed=0):
    """A data folder in the contract's layout: {split}.jsonl, images/{split}/*.png, meta.json."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    names = [f"{flag} class {i}" for i in range(num_classes)]
    for split, n in zip(("train", "val", "test"), n_per_split):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = ([j for j in range(num_classes) if rng.random() < 0.4] if task_type == "multi-label"
                         else [i % num_classes])
                rel = f"images/{split}/{i:05d}.png"
                Image.fromarray(_blob_image(rng, label)).save(out / rel)
                f.write(json.dumps({"id": f"{flag}/{split}/{i:05d}", "image": rel, "label": label, "task": flag,
                                    "conversations": [{"from": "human", "value": "<image>\nAnalyze."},
                                                      {"from": "gpt", "value": names[label[0]] if label else "none"}]})
                        + "\n")
    meta = {"dataset": flag, "task_type": task_type, "label_names": names, "modality": "test", "size": 28,
            "n_channels": 3, "instruction_variant": "complete", "generated": True}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def write_merged_set(out, parts):
    """Merge contract folders like data_tools' merge: records keep local labels, meta gets 'tasks'."""
    out = Path(out)
    tasks, joint, offset = {}, [], 0
    for folder in parts:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        tasks[meta["dataset"]] = {"offset": offset, "num_classes": len(meta["label_names"]),
                                  "label_names": meta["label_names"], "task_type": meta["task_type"]}
        joint += meta["label_names"]
        offset += len(meta["label_names"])
    for split in ("train", "val", "test"):
        with open(out / f"{split}.jsonl", "w") as f:
            for folder in parts:
                for line in (Path(folder) / f"{split}.jsonl").read_text().splitlines():
                    rec = json.loads(line)
                    rec["image"] = os.path.relpath(Path(folder) / rec["image"], out)
                    f.write(json.dumps(rec) + "\n")
    (out / "meta.json").write_text(json.dumps({"dataset": "merged", "task_type": "multi-task",
                                               "label_names": joint, "tasks": tasks}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tsm_data")
    derma = write_contract_set(root / "derma", "dermamnist", "multi-class", 3)
    chest = write_contract_set(root / "chest", "chestmnist", "multi-label", 4, seed=1)
    merged = root / "merged"
    merged.mkdir()
    write_merged_set(merged, [derma, chest])
    return {"derma": derma, "chest": chest, "merged": merged}


def save_mmengine_checkpoint(model, path):
    """What mmengine's CheckpointHook writes, minus the optimizer."""
    torch.save({"meta": {"epoch": 1}, "state_dict": model.state_dict()}, path)
    return str(path)


# ----------------------------------------------------------------------------- joint-mode loss masking
JOINT_TASKS = {"a": {"offset": 0, "num_classes": 3, "task_type": "multi-class"},
               "b": {"offset": 3, "num_classes": 2, "task_type": "multi-label"}}


def _layout():
    return {"a": TaskSlice("a", 0, 3, "multi-class"), "b": TaskSlice("b", 3, 2, "multi-label")}


def test_joint_loss_is_restricted_to_each_samples_task_slice():
    logits = torch.tensor([[2.0, 0.5, -1.0, 9.0, -9.0],     # task a, class 0
                           [0.1, 0.2, 0.3, 1.5, -0.5]], requires_grad=True)  # task b, findings [1, 0]
    gts = [torch.tensor(0), torch.tensor([1.0, 0.0])]
    loss = task_restricted_loss(logits, gts, ["a", "b"], _layout())
    ce_a = -torch.log_softmax(torch.tensor([2.0, 0.5, -1.0]), 0)[0]
    bce_b = F.binary_cross_entropy_with_logits(torch.tensor([1.5, -0.5]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(loss, (ce_a + bce_b) / 2, atol=1e-6)
    loss.backward()
    # no gradient leaks to the other task's classes
    assert torch.all(logits.grad[0, 3:] == 0) and torch.all(logits.grad[1, :3] == 0)
    assert torch.all(logits.grad[0, :3] != 0) and torch.all(logits.grad[1, 3:] != 0)


def test_joint_loss_ignores_logits_outside_the_slice():
    gts, tasks = [torch.tensor(2), torch.tensor(1)], ["a", "a"]
    logits = torch.randn(2, 5)
    shifted = logits.clone()
    shifted[:, 3:] += 100.0  # huge logits in task b's slice must not matter for task a samples
    assert torch.allclose(task_restricted_loss(logits, gts, tasks, _layout()),
                          task_restricted_loss(shifted, gts, tasks, _layout()))
    assert torch.allclose(task_restricted_loss(logits, gts, tasks, _layout()),
                          F.cross_entropy(logits[:, :3], torch.stack(gts)))


def test_model_joint_mode_loss_and_predict_use_own_slice():
    model = TaskSpecificModel(tasks=JOINT_TASKS, **TINY)
    assert model.num_classes == 5 and model.joint
    x = torch.randn(2, 3, 32, 32)
    samples = [{"gt_label": torch.tensor(1), "task": "a", "id": "a/1"},
               {"gt_label": torch.tensor([0.0, 1.0]), "task": "b", "id": "b/1"}]
    loss = model(x, samples, mode="loss")["loss"]
    logits = model(x, mode="tensor")
    assert torch.allclose(loss, task_restricted_loss(logits, [s["gt_label"] for s in samples], ["a", "b"],
                                                     model.layout), atol=1e-5)
    pred = model(x, samples, mode="predict")
    assert pred[0]["scores"].shape == (3,) and torch.isclose(pred[0]["scores"].sum(), torch.tensor(1.0))
    assert pred[1]["scores"].shape == (2,) and pred[1]["task_type"] == "multi-label"
    assert pred[1]["pred_label"].shape == (2,) and pred[0]["pred_label"].dim() == 0


def test_joint_layout_allows_shared_slices_and_refuses_gaps():
    shared = dict(JOINT_TASKS, c={"offset": 0, "num_classes": 3, "task_type": "multi-class"})
    assert TaskSpecificModel(tasks=shared, **TINY).num_classes == 5  # like OrganA/C/S sharing 11 organs
    with pytest.raises(VITaskError, match="tile"):
        TaskSpecificModel(tasks={"a": {"offset": 1, "num_classes": 3, "task_type": "multi-class"}}, **TINY)


# ----------------------------------------------------------------------------- model, features, bad inputs
def test_extract_features_cls_and_all_are_frozen_eval_no_grad():
    model = TaskSpecificModel(num_classes=4, **TINY)
    model.train()
    x = torch.randn(3, 3, 32, 32)
    cls = model.extract_features(x, "cls")
    tokens = model.extract_features(x, "all")
    assert cls.shape == (3, model.feature_dim) == (3, 192)
    assert tokens.shape == (3, 64, 192) and model.feature_shape("all") == (64, 192)
    assert not cls.requires_grad and model.training  # mode restored, no graph kept
    # the CLS token of a ViT is its pre-logits feature: the head applied to it gives the logits
    model.eval()
    assert torch.allclose(model.backbone.head(cls), model(x), atol=1e-5)
    with pytest.raises(VITaskError, match="'cls'"):
        model.extract_features(x, "mean")
    with pytest.raises(VITaskError, match="3, 32, 32"):
        model.extract_features(torch.randn(1, 3, 28, 28))


def test_frozen_tsm_stays_in_eval_mode():
    model = TaskSpecificModel(num_classes=2, **TINY).freeze()
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_non_vit_backbone_features():
    model = TaskSpecificModel(model_name="resnet18", num_classes=3, img_size=64, task_type="binary")
    x = torch.randn(2, 3, 64, 64)
    assert model.extract_features(x).shape == (2, 512)
    assert model.extract_features(x, "all").shape == (2, 4, 512)  # 2x2 map flattened


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_name="vit_nonexistent_patch99", num_classes=3), "timm has no model named"),
    (dict(model_name="vit_tiny_patch16_224.no_such_tag", num_classes=3), "no pretrained tag"),
    (dict(model_name="vit_tiny_patch16_224", num_classes=3, img_size=28), "not a multiple of"),
    (dict(model_name="vit_tiny_patch16_224", num_classes=0), "num_classes"),
    (dict(model_name="vit_tiny_patch16_224", num_classes=3, task_type="regression"), "task_type"),
    (dict(model_name="vit_tiny_patch16_224", num_classes=3, checkpoint="/no/such/weights.pth"), "does not exist"),
])
def test_bad_model_arguments_are_one_clear_error(kwargs, match):
    with pytest.raises(VITaskError, match=match) as err:
        TaskSpecificModel(**kwargs)
    assert "\n" not in str(err.value)


def test_local_timm_weights_file_initializes_the_backbone(tmp_path):
    source = TaskSpecificModel(num_classes=10, **TINY)
    weights = tmp_path / "timm_weights.pth"
    torch.save(source.backbone.state_dict(), weights)
    model = TaskSpecificModel(num_classes=3, checkpoint=str(weights), **TINY)  # head re-initialized
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)
    assert model.backbone.head.out_features == 3


# ----------------------------------------------------------------------------- checkpoints
def test_load_tsm_round_trip_freezes_and_checksums(tmp_path):
    model = TaskSpecificModel(num_classes=4, **TINY)
    ckpt = save_mmengine_checkpoint(model, tmp_path / "tsm.pth")
    loaded = load_tsm(ckpt)  # the checkpoint records the timm model and its arguments: no config needed
    assert loaded.sha256 == tsm_checksum(ckpt) and len(loaded.sha256) == 64
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded.extract_features(x), model.extract_features(x))
    identity = read_tsm_identity(ckpt)  # what VITask's dataset needs for the TSM's pixels
    assert (identity["img_size"], identity["mean"], identity["num_classes"]) == (32, [0.5] * 3, 4)
    assert identity["model_kwargs"] == {"patch_size": 4, "depth": 2}


def without_model_kwargs(path):
    """The checkpoint as older versions wrote it: an identity without the timm arguments."""
    state = torch.load(path, weights_only=True)
    del state["state_dict"]["_extra_state"]["model_kwargs"]
    torch.save(state, path)
    return str(path)


def test_load_tsm_refuses_non_tsm_and_mismatched_checkpoints(tmp_path):
    other = torch.nn.Linear(3, 3)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "linear.pth")
    with pytest.raises(VITaskError, match="not a TSM checkpoint"):
        load_tsm(str(tmp_path / "linear.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VITaskError, match="not a torch TSM checkpoint"):
        load_tsm(str(tmp_path / "junk.pth"))
    with pytest.raises(VITaskError, match="does not exist"):
        load_tsm(str(tmp_path / "missing.pth"))
    # older checkpoints are rebuilt from their training config: its architecture must be theirs
    seven = without_model_kwargs(save_mmengine_checkpoint(TaskSpecificModel(num_classes=7, **TINY),
                                                          tmp_path / "seven.pth"))
    assert load_tsm(seven, TINY_CFG).num_classes == 7  # the checkpoint's head wins over the config's
    other_arch = dict(TINY, model_kwargs=dict(patch_size=4, depth=3))
    deeper = without_model_kwargs(save_mmengine_checkpoint(TaskSpecificModel(num_classes=4, **other_arch),
                                                           tmp_path / "deep.pth"))
    with pytest.raises(VITaskError, match="does not match the config's TSM .*blocks.2"):
        load_tsm(deeper, TINY_CFG)
    assert load_tsm(save_mmengine_checkpoint(TaskSpecificModel(num_classes=4, **other_arch), tmp_path / "d.pth")
                    ).backbone.blocks[2] is not None  # the same TSM with its identity: no config needed
    resnet = without_model_kwargs(save_mmengine_checkpoint(TaskSpecificModel("resnet18", 4, img_size=32),
                                                           tmp_path / "resnet.pth"))
    with pytest.raises(VITaskError, match="is a resnet18 TSM but the config builds vit_tiny"):
        load_tsm(resnet, TINY_CFG)


class _WritesAFile:
    """A pickle payload: unpickling it creates ``path`` (any code could run instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_in_a_tsm_checkpoint_is_refused(tmp_path):
    """TSM checkpoints and exemplar caches load weights-only: a pickled callable is refused, never run."""
    marker = tmp_path / "pwned"
    model = TaskSpecificModel(num_classes=4, **TINY)
    bad = tmp_path / "downloaded_tsm.pth"
    torch.save({"meta": {"note": _WritesAFile(marker)}, "state_dict": model.state_dict()}, bad)
    for load in (lambda: load_tsm(str(bad)), lambda: read_tsm_identity(str(bad))):
        with pytest.raises(VITaskError, match=r"holds a pickled io.open, .*refused, loading it could run code"
                           ) as err:
            load()
        assert "\n" not in str(err.value)
    cache = tmp_path / "cache.pt"
    torch.save({"format_version": 1, "ids": ["a"], "features": torch.zeros(1, 4), "feature_kind": "cls",
                "feature_dim": 4, "tsm_sha256": "0" * 64, "x": _WritesAFile(marker)}, cache)
    with pytest.raises(VITaskError, match="not an exemplar cache"):
        ExemplarCache.load(str(cache))
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the payload itself works: only the weights-only load stopped it
    assert marker.exists()


def test_check_tsm_matches_meta(data):
    three = TaskSpecificModel(num_classes=3, **TINY)
    check_tsm_matches_meta(three, data["derma"] / "meta.json")
    with pytest.raises(VITaskError, match="TSM has 3 classes but .* has 4"):
        check_tsm_matches_meta(three, data["chest"] / "meta.json")
    with pytest.raises(VITaskError, match="merged set"):
        check_tsm_matches_meta(three, data["merged"] / "meta.json")
    joint = TaskSpecificModel(meta=str(data["merged"] / "meta.json"), **TINY)
    check_tsm_matches_meta(joint, data["merged"] / "meta.json")
    check_tsm_matches_meta(joint, data["derma"] / "meta.json")  # the joint TSM serves each of its sets
    four_class = {"dataset": "octmnist", "task_type": "multi-class", "label_names": list("abcd")}
    with pytest.raises(VITaskError, match="joint TSM has no"):
        check_tsm_matches_meta(joint, four_class)


def test_joint_tsm_checkpoint_loads_without_the_data(tmp_path, data):
    joint = TaskSpecificModel(meta=str(data["merged"] / "meta.json"), **TINY)
    ckpt = save_mmengine_checkpoint(joint, tmp_path / "joint.pth")
    loaded = load_tsm(ckpt)
    assert loaded.joint and loaded.tasks == joint.tasks and loaded.num_classes == 7


def test_the_head_comes_from_the_datas_meta_json(data, tmp_path):
    """Configs name the data's meta.json, not a class count (issue: a forgotten num_classes gave
    `IndexError: Target 5 is out of bounds`)."""
    chest = TaskSpecificModel(meta=str(data["chest"] / "meta.json"), **TINY)
    assert (chest.num_classes, chest.task_type) == (4, "multi-label")
    assert classes_from_meta(data["merged"] / "meta.json")[2] == json.loads(
        (data["merged"] / "meta.json").read_text())["tasks"]
    with pytest.raises(VITaskError, match="num_classes=4 but .*derma/meta.json says 3: drop num_classes"):
        TaskSpecificModel(meta=str(data["derma"] / "meta.json"), num_classes=4, **TINY)
    with pytest.raises(VITaskError, match="meta file .*nowhere/meta.json does not exist"):
        TaskSpecificModel(meta=str(tmp_path / "nowhere" / "meta.json"), **TINY)
    # a head built for another data set: labels it cannot score are one clear error, not an IndexError
    four = TaskSpecificModel(num_classes=4, **TINY)
    samples = [{"gt_label": torch.tensor(5), "task": None}, {"gt_label": torch.tensor(1), "task": None}]
    with pytest.raises(VITaskError, match="label 5 but the TSM head has 4 classes: point model.meta"):
        four(torch.randn(2, 3, 32, 32), samples, mode="loss")
    multi = TaskSpecificModel(num_classes=3, task_type="multi-label", **TINY)
    with pytest.raises(VITaskError, match="4 labels per sample but the TSM head has 3"):
        multi(torch.randn(1, 3, 32, 32), [{"gt_label": torch.ones(4), "task": None}], mode="loss")


# ----------------------------------------------------------------------------- dataset
def test_dataset_items_and_collate(data):
    ds = ImageClassificationDataset(data["derma"] / "train.jsonl", img_size=32)
    item = ds[1]
    assert item["inputs"].shape == (3, 32, 32) and item["inputs"].dtype == torch.float32
    assert item["data_samples"] == {"gt_label": torch.tensor(1), "task": "dermamnist", "id": "dermamnist/train/00001"}
    batch = tsm_collate([ds[0], ds[1]])
    assert batch["inputs"].shape == (2, 3, 32, 32) and len(batch["data_samples"]) == 2
    chest = ImageClassificationDataset(data["chest"] / "val.jsonl", img_size=32)
    gt = chest[0]["data_samples"]["gt_label"]
    assert gt.dtype == torch.float32 and gt.shape == (4,)
    rec = chest.records[0]
    assert gt.nonzero().flatten().tolist() == rec["label"]


def test_joint_dataset_keeps_local_labels_and_tasks(data):
    ds = ImageClassificationDataset(data["merged"] / "train.jsonl", img_size=32)
    tasks = {ds[i]["data_samples"]["task"] for i in range(len(ds))}
    assert tasks == {"dermamnist", "chestmnist"}
    chest_item = next(ds[i] for i in range(len(ds)) if ds[i]["data_samples"]["task"] == "chestmnist")
    assert chest_item["data_samples"]["gt_label"].shape == (4,)


def test_transform_is_shared_and_deterministic(data):
    ds = ImageClassificationDataset(data["derma"] / "val.jsonl", img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    img = Image.open(data["derma"] / ds.records[0]["image"]).convert("RGB")
    assert torch.equal(ds[0]["inputs"], build_tsm_transform(32, (0.5,) * 3, (0.25,) * 3)(img))
    train_tf = build_tsm_transform(32, train=True)
    assert train_tf(img).shape == (3, 32, 32)


def test_dataset_bad_inputs(tmp_path, data):
    with pytest.raises(VITaskError, match="does not exist"):
        ImageClassificationDataset(tmp_path / "none.jsonl", meta_file=data["derma"] / "meta.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text((data["derma"] / "meta.json").read_text())
    (bad / "train.jsonl").write_text(json.dumps({"id": "x/1", "image": "nope.png", "label": [0]}) + "\n")
    with pytest.raises(VITaskError, match="missing"):
        ImageClassificationDataset(bad / "train.jsonl")
    Image.new("RGB", (28, 28)).save(bad / "nope.png")
    (bad / "train.jsonl").write_text(json.dumps({"id": "x/1", "image": "nope.png", "label": [7]}) + "\n")
    with pytest.raises(VITaskError, match="outside"):
        ImageClassificationDataset(bad / "train.jsonl")[0]


# ----------------------------------------------------------------------------- configs
def test_every_tsm_config_loads_and_reads_its_head_from_the_data():
    from mmengine.config import Config

    from xtuner_vitask.data.medmnist import MEDMNIST_2D_FLAGS, label_names, task_type

    short = {flag: flag.replace("mnist", "") for flag in MEDMNIST_2D_FLAGS}
    for flag in MEDMNIST_2D_FLAGS:
        cfg = Config.fromfile(REPO / "configs" / f"tsm_vit_base_{short[flag]}.py")
        assert cfg.model.type is TaskSpecificModel
        assert "num_classes" not in cfg.model and "task_type" not in cfg.model  # nothing to forget or get wrong
        assert cfg.model.meta == f"data/{flag}_224/meta.json"
        meta = {"dataset": flag, "task_type": task_type(flag), "label_names": label_names(flag)}
        assert classes_from_meta(meta)[:2] == (len(label_names(flag)), task_type(flag))
        assert cfg.train_dataloader.dataset.data_file == f"data/{flag}_224/train.jsonl"
        assert cfg.val_dataloader.dataset.data_file == f"data/{flag}_224/val.jsonl"
        assert cfg.model.model_name == "vit_base_patch16_224.augreg_in21k" and cfg.model.pretrained
        assert cfg.default_hooks.checkpoint.save_best == "macro_f1"
    joint = Config.fromfile(REPO / "configs" / "tsm_vit_base_joint.py")
    assert joint.model.meta == "data/medmnist_joint_224/meta.json"
    assert joint.param_scheduler[1].end == joint.train_cfg.max_epochs
    tiny = Config.fromfile(TINY_CFG)
    assert tiny.model.meta == "data/tiny_tsm/meta.json" and "num_classes" not in tiny.model
    assert tiny.randomness.seed == 0 and tiny.optim_wrapper.type.__name__ == "OptimWrapper"


def test_derma_config_builds_vit_b16_offline():
    from mmengine.config import Config

    from xtuner_vitask.data.medmnist import label_names

    cfg = Config.fromfile(REPO / "configs" / "tsm_vit_base_derma.py")
    meta = {"dataset": "dermamnist", "task_type": "multi-class", "label_names": label_names("dermamnist")}
    model_cfg = dict(cfg.model, pretrained=False, meta=meta)  # no hub here: same architecture, random weights
    model = model_cfg.pop("type")(**model_cfg)
    assert model.feature_dim == 768 and model.feature_shape("all") == (196, 768) and model.num_classes == 7


def test_tsm_code_and_configs_do_not_import_xtuner():
    """A TSM-only run pays for mmengine, timm and torch, not for XTuner (~9 s on 2 cores)."""
    code = ("import sys; from mmengine.config import Config; import xtuner_vitask.tsm as t; "
            "[getattr(t, n) for n in t.__all__]; Config.fromfile(sys.argv[1]); "
            "import xtuner_vitask.cli.cache_exemplars; "
            "print(sorted(m for m in sys.modules if m == 'xtuner' or m.startswith('xtuner.')))")
    for config in (TINY_CFG, REPO / "configs" / "tsm_vit_base_joint.py"):
        run = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- exemplar cache
@pytest.fixture(scope="module")
def tsm_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tsm_ckpt") / "tsm3.pth"
    return save_mmengine_checkpoint(TaskSpecificModel(num_classes=3, **TINY), path)


def test_cache_round_trip_and_refusals(tmp_path, data, tsm_ckpt):
    tsm = load_tsm(tsm_ckpt)
    out = tmp_path / "cache_cls.pt"
    summary = build_exemplar_cache(tsm, [data["derma"]], out, kind="cls", batch_size=8, progress=False)
    assert summary["n"] == 24 and summary["shape"] == (24, 192)
    ids = [json.loads(line)["id"] for s in ("train", "val", "test")
           for line in (data["derma"] / f"{s}.jsonl").read_text().splitlines()]
    cache = ExemplarCache.load(out, expected_tsm_sha256=tsm.sha256, expected_kind="cls", required_ids=ids)
    assert len(cache) == 24 and cache.features.dtype == torch.float16 and cache.feature_dim == 192
    # the cached exemplar is what the TSM computes on the shared transform's pixels
    val = ImageClassificationDataset(data["derma"] / "val.jsonl", img_size=tsm.img_size, mean=tsm.mean, std=tsm.std)
    direct = tsm.extract_features(val[2]["inputs"][None])[0]
    assert torch.allclose(cache[val.records[2]["id"]].float(), direct, atol=2e-2)
    assert cache[[ids[0], ids[5]]].shape == (2, 192)
    # stale caches are refused
    with pytest.raises(VITaskError, match="another TSM"):
        ExemplarCache.load(out, expected_tsm_sha256="0" * 64)
    with pytest.raises(VITaskError, match="--kind all"):
        ExemplarCache.load(out, expected_kind="all")
    with pytest.raises(VITaskError, match="lacks 1 record ids .*chestmnist/train/00000"):
        ExemplarCache.load(out, required_ids=ids + ["chestmnist/train/00000"])
    with pytest.raises(VITaskError, match="not in exemplar cache"):
        cache["nope/1"]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(VITaskError, match="not an exemplar cache"):
        ExemplarCache.load(tmp_path / "junk.pt")


def test_cache_of_all_tokens_over_several_folders(tmp_path, data, tsm_ckpt):
    tsm = load_tsm(tsm_ckpt)
    out = tmp_path / "cache_all.pt"
    summary = build_exemplar_cache(tsm, [data["derma"], data["chest"] / "val.jsonl"], out, kind="all",
                                   progress=False)
    assert summary["shape"] == (30, 64, 192)
    cache = ExemplarCache.load(out, expected_kind="all")
    assert cache["chestmnist/val/00003"].shape == (64, 192)
    with pytest.raises(VITaskError, match="appears"):  # the same ids twice
        build_exemplar_cache(tsm, [data["derma"], data["derma"] / "val.jsonl"], out, progress=False)


def test_cache_exemplars_cli(tmp_path, data, tsm_ckpt):
    from xtuner_vitask.cli import cache_exemplars

    parser = argparse.ArgumentParser()
    cache_exemplars.add_arguments(parser)
    out = tmp_path / "c.pt"
    args = parser.parse_args(["--tsm", tsm_ckpt, "--data", str(data["derma"]),
                              "--out", str(out), "--batch-size", "4"])
    assert cache_exemplars.run(args) == 0
    assert ExemplarCache.load(out, expected_tsm_sha256=tsm_checksum(tsm_ckpt), expected_kind="cls")
    args = parser.parse_args(["--tsm", tsm_ckpt, "--data", str(data["chest"]),
                              "--out", str(out)])
    with pytest.raises(VITaskError, match="TSM has 3 classes"):
        cache_exemplars.run(args)


# ----------------------------------------------------------------------------- end to end through xtuner's train tool
def _val_records(work_dir):
    logs = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    assert logs, f"no scalars.json under {work_dir}"
    return [r for r in map(json.loads, Path(logs[0]).read_text().splitlines()) if "macro_f1" in r]


@pytest.mark.slow
def test_tiny_tsm_trains_through_xtuner_train_tool(tmp_path):
    """Generated MedMNIST-layout npz -> data_tools convert -> `python -m xtuner.tools.train` -> cache."""
    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    npz = write_medmnist_npz(tmp_path / "dermamnist.npz", "dermamnist", n_per_split=(280, 84, 84), seed=0)
    data_dir = convert_medmnist("dermamnist", 28, tmp_path / "derma", npz_path=npz, progress=False)
    work_dir = tmp_path / "work"
    cmd = [sys.executable, "-m", "xtuner.tools.train", str(TINY_CFG), "--work-dir", str(work_dir),
           "--cfg-options", f"train_dataloader.dataset.data_file={data_dir}/train.jsonl",
           f"val_dataloader.dataset.data_file={data_dir}/val.jsonl", f"model.meta={data_dir}/meta.json"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    vals = _val_records(work_dir)
    assert len(vals) == 8  # validated every epoch
    best = max(r["macro_f1"] for r in vals)
    print(f"\ntiny TSM val per epoch: {[(round(r['accuracy'], 3), round(r['macro_f1'], 3)) for r in vals]}")
    # chance on 7 balanced-ish classes: accuracy ~0.14-0.2, macro-F1 well below 0.2
    assert best > 0.45 and vals[-1]["accuracy"] > 0.5
    # AUC from chance (measured 0.52 after epoch 1) to well above it (0.98 by epoch 6): the metric ranks scores
    assert vals[0]["auc"] < 0.75 and max(r["auc"] for r in vals) > 0.85
    best_ckpt = glob.glob(str(work_dir / "best_macro_f1_epoch_*.pth"))
    assert len(best_ckpt) == 1
    # the trained TSM loads frozen (config from the file, or from the checkpoint itself) and caches exemplars
    tsm = load_tsm(best_ckpt[0])  # weights-only: mmengine's training state is on the allowlist
    assert tsm.num_classes == 7
    from xtuner_vitask._compat import training_state_globals

    allowed = {f"{g.__module__}.{g.__qualname__}" for g in training_state_globals()}
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(best_ckpt[0]))
    assert needed <= allowed, needed - allowed
    check_tsm_matches_meta(tsm, data_dir / "meta.json")
    start = time.perf_counter()
    summary = build_exemplar_cache(tsm, [data_dir], tmp_path / "ex.pt", progress=False)
    print(f"cache: {summary['n']} images in {time.perf_counter() - start:.2f}s "
          f"({summary['images_per_s']:.0f} images/s, forward+load)")
    assert summary["n"] == 448
