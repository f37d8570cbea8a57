"""VITaskInternVL, its dataset and collate: EP splicing, losses per stage, gradients, bad input."""
import json

import pytest
import torch
from peft import LoraConfig

from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.models import VITaskInternVL

LORA = dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="auto", task_type="CAUSAL_LM")


def build(tiny_model, tiny_tsm, data, **kw):
    torch.manual_seed(0)
    return VITaskInternVL(tiny_model, freeze_llm=True, attn_implementation="auto", torch_dtype="float32",
                          activation_checkpointing=False, llm_lora=LORA,
                          tsm=dict(checkpoint=tiny_tsm, meta=f"{data}/meta.json"), **kw)


def dataset(tiny_model, data, **kw):
    return VITaskDataset(tiny_model, f"{data}/train.jsonl", tsm_img_size=32, max_length=512, **kw)


@pytest.fixture(scope="module")
def batch(tiny_model, derma_data):
    ds = dataset(tiny_model, derma_data)
    return vitask_collate_fn([ds[i] for i in range(6)])["data"]


def test_negatives_are_label_aware_seeded_and_taken_from_the_batch_first(tiny_model, derma_data):
    ds = dataset(tiny_model, derma_data, seed=3)
    for i in range(len(ds)):
        j = ds.negative_index(i)
        assert ds.instruction_key[j] == ds.instruction_key[i] and ds.response_key[j] != ds.response_key[i]
    assert [ds.negative_index(i) for i in range(20)] == [dataset(tiny_model, derma_data, seed=3).negative_index(i)
                                                         for i in range(20)]
    items = [ds[i] for i in range(8)]
    data = vitask_collate_fn(items)["data"]
    n_extra = 0 if data["neg_pixel_values"] is None else len(data["neg_pixel_values"])
    in_batch = [k for k, idx in enumerate(data["neg_image_index"].tolist()) if idx < len(items)]
    assert len(in_batch) + n_extra == len(items)
    for k in in_batch:  # an in-batch negative has another response
        assert items[data["neg_image_index"][k]]["response_key"] != items[k]["response_key"]
    assert len(in_batch) > 0  # 8 samples of a 7-class set always contain two classes


def test_stage1_terms_and_rda_gradient_stays_out_of_the_ep_branch(tiny_model, tiny_tsm, derma_data, batch):
    model = build(tiny_model, tiny_tsm, derma_data)
    terms = model.compute_losses(batch)
    assert list(terms) == ["loss_van", "loss_ep", "loss_rda"]
    terms["loss_rda"].backward()
    # the exemplar-prompted distribution is the detached teacher: no gradient reaches the connector
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.connector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)

    star = build(tiny_model, tiny_tsm, derma_data, detach_rda=False)  # RDA*
    star.compute_losses(batch)["loss_rda"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in star.connector.parameters())


def test_stage2_freezes_connector_and_adds_crt(tiny_model, tiny_tsm, derma_data, batch):
    model = build(tiny_model, tiny_tsm, derma_data, alpha=0.5, beta=2.0)
    model.set_stage(2)
    terms = model(batch)
    assert list(terms) == ["loss_van", "loss_ep", "loss_rda", "loss_crt"]
    total, log_vars = model.parse_losses(terms)
    expected = terms["loss_van"] + terms["loss_ep"] + 0.5 * terms["loss_rda"] + 2.0 * terms["loss_crt"]
    assert torch.allclose(total, expected) and set(log_vars) == {"loss", *terms}
    total.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.connector.parameters())
    model.set_stage(1)
    assert all(p.requires_grad for p in model.connector.parameters())


@pytest.mark.parametrize("mode", ["all", "rep"])
def test_ep_modes_all_and_rep_run(tiny_model, tiny_tsm, derma_data, batch, mode):
    model = build(tiny_model, tiny_tsm, derma_data, ep_mode=mode)
    terms = model(batch)
    assert all(torch.isfinite(v) for v in terms.values())


def test_checkpoint_holds_lora_and_connector_not_towers(tiny_model, tiny_tsm, derma_data):
    keys = list(build(tiny_model, tiny_tsm, derma_data).state_dict())
    assert any(k.startswith("connector.") for k in keys) and any("lora_" in k for k in keys)
    assert not any(k.startswith("tsm.") or "vision_model" in k for k in keys)


def test_bad_configs_are_clear_errors(tiny_model, tiny_tsm, derma_data, tmp_path):
    with pytest.raises(VITaskError, match="not an EP mode"):
        build(tiny_model, tiny_tsm, derma_data, ep_mode="patch")
    with pytest.raises(VITaskError, match="alpha=-1"):
        build(tiny_model, tiny_tsm, derma_data, alpha=-1)
    with pytest.raises(VITaskError, match="rda_kl='both'"):
        build(tiny_model, tiny_tsm, derma_data, rda_kl="both")
    with pytest.raises(VITaskError, match="exemplar_dim=7"):
        build(tiny_model, tiny_tsm, derma_data, exemplar_dim=7)
    meta = json.load(open(f"{derma_data}/meta.json"))
    meta["label_names"] = meta["label_names"][:5]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VITaskError, match="classes"):
        VITaskInternVL(tiny_model, torch_dtype="float32", tsm=dict(checkpoint=tiny_tsm, meta=str(tmp_path / "meta.json")))
    with pytest.raises(VITaskError, match="does not exist"):
        VITaskInternVL(tiny_model, torch_dtype="float32", tsm=dict(checkpoint=str(tmp_path / "none.pth")))


def test_one_class_data_cannot_give_crt_negatives(tiny_model, derma_data, tmp_path):
    lines = open(f"{derma_data}/train.jsonl").read().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        r["conversations"][1]["value"] = "melanoma"
        r["label"] = [4]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "meta.json").write_text(open(f"{derma_data}/meta.json").read())
    with pytest.raises(VITaskError, match="no CRT negative"):
        VITaskDataset(tiny_model, str(tmp_path / "train.jsonl"), image_folders=derma_data, tsm_img_size=32)


def test_label_outside_classes_is_refused(tiny_model, derma_data, tmp_path):
    records = [json.loads(line) for line in open(f"{derma_data}/train.jsonl")]
    records[3]["label"] = [42]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "meta.json").write_text(open(f"{derma_data}/meta.json").read())
    with pytest.raises(VITaskError, match="line 4: label 42 is outside"):
        VITaskDataset(tiny_model, str(tmp_path / "train.jsonl"), image_folders=derma_data, tsm_img_size=32)


def test_non_finite_loss_names_term_and_samples(tiny_model, tiny_tsm, derma_data, batch):
    model = build(tiny_model, tiny_tsm, derma_data)
    with torch.no_grad():
        model.connector.proj[1].weight.fill_(float("nan"))
    with pytest.raises(VITaskError, match=r"non-finite loss_ep.*dermamnist/train/"):
        model(batch)


def test_collate_encodes_a_negative_drawn_twice_once(tiny_model, derma_data):
    ds = dataset(tiny_model, derma_data)
    same = [i for i in range(len(ds)) if ds.response_key[i] == ds.response_key[0]][:3]
    items = [ds[i] for i in same]  # one response: no in-batch negative, each brings its drawn one
    items[1]["neg_id"], items[1]["negative"] = items[0]["neg_id"], items[0]["negative"]
    data = vitask_collate_fn(items)["data"]
    index = data["neg_image_index"].tolist()
    assert index[0] == index[1] >= len(items) and index[2] >= len(items)
    assert len(data["neg_pixel_values"]) == len({item["neg_id"] for item in items})
    assert torch.equal(data["neg_pixel_values"][index[2] - len(items)], items[2]["negative"].pixel_values()[0])


def test_checkpoint_globs_pick_the_newest_match(tmp_path):
    import os

    from xtuner_vitask.tsm.checkpoint import resolve_checkpoint

    old, new = tmp_path / "best_macro_f1_epoch_2.pth", tmp_path / "best_macro_f1_epoch_7.pth"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (1, 1))
    assert resolve_checkpoint(str(tmp_path / "best_*.pth")) == str(new)
    assert resolve_checkpoint(str(old)) == str(old)
    with pytest.raises(VITaskError, match="no TSM checkpoint matches"):
        resolve_checkpoint(str(tmp_path / "last_*.pth"))
