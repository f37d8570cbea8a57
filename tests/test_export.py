"""Export through XTuner's own pth_to_hf: complete folders, AutoModel + chat, LoRA merged by peft
(numerically), the EP variant's connector and TSM, plug-and-play TSM swap, and bad input."""
import copy
import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from export_fixtures import exports, pth_to_hf  # noqa: F401  (fixture)
from xtuner_vitask.errors import VITaskError

QUESTION = "<image>\nAnalyze the given dermatoscope image for diagnosis."


def load_auto(folder):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def state_of(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


# ------------------------------------------------------------------------------- fast: folder checks
def fake_folder(root, vitask=False, drop=()):
    """A folder with the names (not the contents) of an export: enough for inspect_export."""
    os.makedirs(root, exist_ok=True)
    config = {"architectures": ["InternVLChatModel"],
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel"}}
    names = ["configuration_internvl_chat.py", "modeling_internvl_chat.py", "model.safetensors",
             "tokenizer_config.json", "tokenizer.json"]
    if vitask:
        config["vitask"] = {"ep_mode": "cls", "exemplar_dim": 8, "tsm_subfolder": "tsm"}
        config["auto_map"]["AutoModel"] = "modeling_vitask.VITaskInternVLChatModel"
        names += ["modeling_vitask.py", "tsm/config.json", "tsm/model.safetensors"]
    for name in names:
        if name not in drop:
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            open(os.path.join(root, name), "w").close()
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    return str(root)


def test_inspect_accepts_complete_folders(tmp_path):
    from xtuner_vitask.export import inspect_export

    assert not inspect_export(fake_folder(tmp_path / "plain")).has_ep
    info = inspect_export(fake_folder(tmp_path / "ep", vitask=True), need_ep=True)
    assert info.has_ep and info.tsm_dir.endswith("tsm")


@pytest.mark.parametrize("missing", ["modeling_internvl_chat.py", "model.safetensors", "tokenizer.json",
                                     "tsm/model.safetensors", "modeling_vitask.py"])
def test_inspect_names_the_missing_file(tmp_path, missing):
    from xtuner_vitask.export import inspect_export

    folder = fake_folder(tmp_path / "m", vitask=True, drop=(missing,))
    with pytest.raises(VITaskError, match="incomplete: missing .*" + os.path.basename(missing).split(".")[0]) as err:
        inspect_export(folder)
    assert "\n" not in str(err.value)


def test_ep_on_a_plain_folder_is_one_clear_error(tmp_path):
    from xtuner_vitask.export import inspect_export

    with pytest.raises(VITaskError, match="--ep needs the EP export.*plain InternVL2 folder"):
        inspect_export(fake_folder(tmp_path / "p"), need_ep=True)
    with pytest.raises(VITaskError, match="does not exist"):
        inspect_export(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VITaskError, match="no config.json"):
        inspect_export(tmp_path / "empty")


def test_label_names_must_match_the_training_meta(tmp_path):
    from xtuner_vitask.export import inspect_export, read_task_meta

    folder = fake_folder(tmp_path / "m")
    meta = {"task_type": "multi-class", "label_names": ["a", "b", "c"]}
    with open(os.path.join(folder, "task_meta.json"), "w") as f:
        json.dump(meta, f)
    data_meta = tmp_path / "meta.json"
    data_meta.write_text(json.dumps(dict(meta, label_names=["a", "x", "c"])))
    with pytest.raises(VITaskError, match=r"label_names differ from the model's training meta.json \('b' vs 'x'\)"):
        read_task_meta(inspect_export(folder), str(data_meta))
    data_meta.write_text(json.dumps(meta))
    assert read_task_meta(inspect_export(folder), str(data_meta))["label_names"] == ["a", "b", "c"]


def test_unreadable_image_in_chat(tmp_path):
    from xtuner_vitask.evaluation.inputs import read_image

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(VITaskError, match="cannot read image .*broken.png"):
        read_image(str(bad))
    with pytest.raises(VITaskError, match="does not exist"):
        read_image(str(tmp_path / "missing.png"))


# ------------------------------------------------------------------------------- slow: real exports
@pytest.mark.slow
def test_exports_are_complete_folders(exports, tiny_model):
    base_files = set(os.listdir(tiny_model))
    for variant in ("ep", "plain"):
        folder = exports[variant]
        files = set(os.listdir(folder))
        py = {f for f in base_files if f.endswith(".py")}
        assert py <= files, f"{variant}: remote code missing"
        for f in py | {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}:
            assert filecmp.cmp(os.path.join(tiny_model, f), os.path.join(folder, f), shallow=False)
        assert {"config.json", "model.safetensors", "task_meta.json", "xtuner_config.py"} <= files
        config = json.load(open(os.path.join(folder, "config.json")))
        assert config["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
    plain = json.load(open(os.path.join(exports["plain"], "config.json")))
    base = json.load(open(os.path.join(tiny_model, "config.json")))
    assert plain["auto_map"] == base["auto_map"] and plain["architectures"] == ["InternVLChatModel"]
    assert "vitask" not in plain and not os.path.exists(os.path.join(exports["plain"], "tsm"))
    ep = json.load(open(os.path.join(exports["ep"], "config.json")))
    assert ep["auto_map"]["AutoModel"] == "modeling_vitask.VITaskInternVLChatModel"
    assert ep["vitask"]["ep_mode"] == "cls" and ep["vitask"]["exemplar_dim"] == 192
    tsm_files = set(os.listdir(os.path.join(exports["ep"], "tsm")))
    assert {"config.json", "model.safetensors", "xtuner_config.py"} <= tsm_files


@pytest.mark.slow
def test_plain_export_loads_with_automodel_and_chats(exports):
    model, tokenizer = load_auto(exports["plain"])
    assert type(model).__name__ == "InternVLChatModel"
    answer = model.chat(tokenizer, torch.randn(1, 3, 64, 64), QUESTION, dict(max_new_tokens=8, do_sample=False))
    assert isinstance(answer, str) and answer.strip()


@pytest.mark.slow
def test_ep_export_chats_with_and_without_exemplars(exports):
    model, tokenizer = load_auto(exports["ep"])
    assert type(model).__name__ == "VITaskInternVLChatModel" and model.tsm is not None
    assert not any(k.startswith("tsm.") for k in model.state_dict())
    pixels = torch.randn(1, 3, 64, 64)
    for use_ep in (True, False):
        answer = model.chat(tokenizer, pixels, QUESTION, dict(max_new_tokens=8, do_sample=False), use_ep=use_ep)
        assert isinstance(answer, str) and answer.strip()
    # the exemplar reaches the LLM: first-step logits differ with and without it
    query = model._build_query(QUESTION, None, [1], "<img>", "</img>", "<IMG_CONTEXT>")[1]
    ids = tokenizer(query, return_tensors="pt")
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    scores = {ep: model.generate(pixel_values=pixels, input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                                 max_new_tokens=1, do_sample=False, use_ep=ep,
                                 output_scores=True, return_dict_in_generate=True).scores[0] for ep in (True, False)}
    assert not torch.allclose(scores[True], scores[False])


@pytest.mark.slow
def test_plain_weights_equal_the_lora_merged_llm_of_the_trained_wrapper(exports, tiny_model):
    """Rebuild the wrapper from the config with real weights, load the .pth, merge with peft and compare."""
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from export_fixtures import CONFIG
    from conftest import REPO

    cfg = Config.fromfile(str(REPO / CONFIG))
    cfg.merge_from_dict({k: (None if v == "None" else v) for k, v in (o.split("=", 1) for o in exports["options"])})
    wrapper = BUILDER.build(cfg.model)
    state = torch.load(exports["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    result = wrapper.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    merged = copy.deepcopy(wrapper.model.language_model).merge_and_unload().state_dict()
    exported = state_of(exports["plain"])
    base = state_of(tiny_model)
    changed = 0
    for name, value in merged.items():
        key = f"language_model.{name}"
        assert key in exported, key
        torch.testing.assert_close(exported[key], value.float(), rtol=1e-6, atol=1e-6, msg=key)
        changed += not torch.equal(exported[key], base[key])
    assert changed >= 10  # LoRA'd projections (and the trained lm_head) moved away from the base
    for name, value in wrapper.model.mlp1.state_dict().items():
        torch.testing.assert_close(exported[f"mlp1.{name}"], value.float())
    for key in (k for k in base if k.startswith("vision_model.")):
        assert torch.equal(exported[key], base[key]), key  # frozen
    assert not any(k.startswith("connector.") for k in exported)
    ep = state_of(exports["ep"])
    for name, value in wrapper.connector.state_dict().items():
        torch.testing.assert_close(ep[f"connector.{name}"], value.float())
    for key in exported:
        assert torch.equal(ep[key], exported[key]), key


@pytest.mark.slow
def test_ep_export_holds_the_trained_tsm(exports, tiny_tsm):
    tsm_state = torch.load(tiny_tsm, map_location="cpu", weights_only=False)["state_dict"]
    exported = load_file(os.path.join(exports["ep"], "tsm", "model.safetensors"))
    assert set(exported) == {k[len("backbone."):] for k in tsm_state if k.startswith("backbone.")}
    for key, value in exported.items():
        assert torch.equal(value, tsm_state[f"backbone.{key}"])


@pytest.mark.slow
def test_checkpoint_from_another_config_is_refused(exports, tmp_path):
    state = torch.load(exports["checkpoint"], map_location="cpu", weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("connector.")}
    bad = tmp_path / "vanilla_like.pth"
    torch.save(state, bad)
    proc = pth_to_hf(bad, tmp_path / "out", exports["options"], check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "VITaskError" in last and "saved with another config" in last and "connector." in last
    assert not os.listdir(tmp_path / "out")  # nothing half-written


# ------------------------------------------------------------------------------- slow: plug
def perturbed_tsm(tsm_checkpoint, path):
    """A 'newly trained' TSM: the same architecture with other weights (and the same stored config)."""
    state = torch.load(tsm_checkpoint, map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    state["state_dict"] = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if torch.is_tensor(v)
                               and v.is_floating_point() else v) for k, v in state["state_dict"].items()}
    torch.save(state, path)
    return str(path)


def narrower_tsm(path):
    """A TSM checkpoint whose features are 96-d (the connector takes 192-d)."""
    from mmengine.config import Config

    from xtuner_vitask.models.tsm import TaskSpecificModel

    model_cfg = dict(type="xtuner_vitask.models.tsm.TaskSpecificModel", model_name="vit_tiny_patch16_224",
                     pretrained=False, img_size=32, num_classes=7, task_type="multi-class",
                     model_kwargs=dict(patch_size=4, depth=1, embed_dim=96, num_heads=3))
    kwargs = {k: v for k, v in model_cfg.items() if k != "type"}
    torch.save({"state_dict": TaskSpecificModel(**kwargs).state_dict(),
                "meta": {"cfg": Config(dict(model=model_cfg)).pretty_text}}, path)
    return str(path)


@pytest.mark.slow
def test_plug_swaps_the_tsm_and_keeps_everything_else_bit_identical(exports, tiny_tsm, tmp_path):
    from xtuner_vitask.cli.plug import plug_tsm

    new_tsm = perturbed_tsm(tiny_tsm, tmp_path / "new_tsm.pth")
    out = tmp_path / "plugged_ep"
    spec = plug_tsm(exports["ep"], new_tsm, str(out))
    assert spec["feature_dim"] == 192
    old_dir = exports["ep"]
    for root, _, files in os.walk(old_dir):
        rel = os.path.relpath(root, old_dir)
        for f in files:
            same = filecmp.cmp(os.path.join(root, f), os.path.join(out, rel, f), shallow=False)
            assert same == (rel != "tsm" or f == "xtuner_config.py"), os.path.join(rel, f)
    new_weights = load_file(os.path.join(out, "tsm", "model.safetensors"))
    new_state = torch.load(new_tsm, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, new_state[f"backbone.{k}"]) for k, v in new_weights.items())
    model, _ = load_auto(str(out))
    assert torch.equal(model.tsm.backbone.state_dict()["cls_token"], new_state["backbone.cls_token"])


@pytest.mark.slow
def test_plug_refuses_other_feature_sizes_and_plain_exports(exports, tmp_path):
    from xtuner_vitask.cli.plug import plug_tsm

    with pytest.raises(VITaskError, match="features have size 96 but the model's connector takes 192"):
        plug_tsm(exports["ep"], narrower_tsm(tmp_path / "narrow.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(VITaskError, match="plain export with no TSM"):
        plug_tsm(exports["plain"], narrower_tsm(tmp_path / "narrow.pth"), str(tmp_path / "out2"))
