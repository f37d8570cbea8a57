"""Export through XTuner's own pth_to_hf: complete folders, AutoModel + chat, LoRA merged by peft
(numerically), the EP variant's connector and TSM, plug-and-play TSM swap, and bad input."""
import copy
import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
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
        names += ["modeling_vitask.py", "exemplar_errors.py", "exemplar_prompting.py", "exemplar_tsm.py",
                  "tsm/config.json", "tsm/model.safetensors"]
    for name in names:
        if name not in drop:
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "w") as f:
                f.write('{"architecture": "vit_tiny_patch16_224"}' if name == "tsm/config.json" else "")
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    return str(root)


def test_inspect_accepts_complete_folders(tmp_path):
    from xtuner_vitask.export import inspect_export

    assert not inspect_export(fake_folder(tmp_path / "plain")).has_ep
    info = inspect_export(fake_folder(tmp_path / "ep", vitask=True), need_ep=True)
    assert info.has_ep and info.tsm_dir.endswith("tsm")


@pytest.mark.parametrize("missing", ["modeling_internvl_chat.py", "model.safetensors", "tokenizer.json",
                                     "tsm/model.safetensors", "modeling_vitask.py", "exemplar_tsm.py"])
def test_inspect_names_the_missing_file(tmp_path, missing):
    from xtuner_vitask.export import inspect_export

    folder = fake_folder(tmp_path / "m", vitask=True, drop=(missing,))
    with pytest.raises(VITaskError, match="incomplete: missing .*" + os.path.basename(missing).split(".")[0]) as err:
        inspect_export(folder)
    assert "\n" not in str(err.value)


def test_sharded_weights_and_old_tsm_folders(tmp_path):
    from xtuner_vitask.export import inspect_export

    folder = fake_folder(tmp_path / "sharded", vitask=True, drop=("model.safetensors",))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        open(os.path.join(folder, name), "w").close()
    assert inspect_export(folder).has_ep  # shards + index are a complete folder
    with open(os.path.join(folder, "tsm", "config.json"), "w") as f:
        json.dump({"format": "xtuner_vitask.tsm/1", "model_name": "vit_tiny_patch16_224"}, f)
    with pytest.raises(VITaskError, match="not in timm's folder layout: .* exported by an older xtuner-vitask"):
        inspect_export(folder)


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


# ------------------------------------------------------------------------------- EP parity: training == export
LORA = dict(type="peft.LoraConfig", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="auto", task_type="CAUSAL_LM")
PARITY_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 both sides; merged LoRA (W + BA) vs unmerged W x + B(A x)


@pytest.fixture(scope="module")
def random_tsm_checkpoint(tmp_path_factory):
    """An untrained tiny TSM saved as mmengine saves it (parity needs its weights, not its accuracy)."""
    from xtuner_vitask.tsm.model import TaskSpecificModel

    torch.manual_seed(1)
    model = TaskSpecificModel("vit_tiny_patch16_224", num_classes=7, img_size=32,
                              model_kwargs=dict(patch_size=4, depth=2))
    path = tmp_path_factory.mktemp("parity_tsm") / "tsm.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": model.state_dict()}, path)
    return str(path)


def trained_wrapper(tiny_model, tsm_checkpoint, ep_mode):
    """A VITaskInternVL whose LoRA and connector are not at their initial values (so the merge matters)."""
    from mmengine.config import ConfigDict
    from peft import LoraConfig

    from xtuner_vitask.models import VITaskInternVL

    torch.manual_seed(2)
    wrapper = VITaskInternVL(tiny_model, tsm=dict(checkpoint=tsm_checkpoint), ep_mode=ep_mode, freeze_llm=True,
                             llm_lora=ConfigDict(dict(LORA, type=LoraConfig)), attn_implementation="auto",
                             torch_dtype="float32", activation_checkpointing=False)
    with torch.no_grad():
        for name, param in wrapper.named_parameters():
            if "lora_B" in name or name.startswith("connector."):
                param.normal_(0, 0.05)
    return wrapper.eval()


def prompt_batch(folder, num_image_token, answer=" melanocytic nevi"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    head, tail = tok("Analyze the image").input_ids, tok(" for diagnosis.").input_ids
    prompt = head + [img] * num_image_token + tail
    answer_ids = tok(answer).input_ids
    ids = torch.tensor([prompt + answer_ids])
    labels = torch.tensor([[-100] * len(prompt) + answer_ids])
    return ids, labels, len(prompt), img


def wrapper_logits(wrapper, ids, labels, pixels, tsm_pixels):
    """(plain, EP) response logits and the EP labels, exactly as training computes them."""
    from xtuner_vitask.ep.exemplar_prompting import splice_exemplars

    mask = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        embeds = wrapper.embed_tokens(ids, wrapper.encode_images(pixels))
        plain, _ = wrapper.response_logits(embeds, mask, positions, labels)
        ep_embeds, ep_mask, ep_labels, ep_positions = splice_exemplars(
            embeds, mask, wrapper.exemplar_spans(ids), wrapper.exemplar_tokens({"tsm_pixel_values": tsm_pixels}),
            labels=labels)
        ep, _ = wrapper.response_logits(ep_embeds, ep_mask, ep_positions, ep_labels)
    return plain, ep, ep_labels


def rows_of(logits, labels):
    return logits[0, :-1][labels[0, 1:] != -100]


@pytest.mark.parametrize("llm, ep_mode", [("internlm2", "cls"), ("internlm2", "all"), ("internlm2", "rep"),
                                          ("qwen2", "cls")])
def test_exported_ep_logits_equal_the_training_wrappers(request, tmp_path, random_tsm_checkpoint, llm, ep_mode):
    """Same image, same prompt: the export's EP and plain logits are the training wrapper's (stated tolerance),
    through AutoModel, through generate (left-padded splice, KV cache) and through load_export_model (eval)."""
    from xtuner_vitask.export import export_to_hf, inspect_export
    from xtuner_vitask.inference.exports import load_export_model

    # InternLM2 (InternVL2-2B's LLM: remote code, eager, tuple KV caches), Qwen2 (InternVL2-1B's: SDPA, Cache objects)
    tiny = request.getfixturevalue("tiny_model" if llm == "internlm2" else "tiny_model_qwen2")
    wrapper = trained_wrapper(tiny, random_tsm_checkpoint, ep_mode)
    folder = tmp_path / f"parity_{llm}_{ep_mode}"  # a distinct name: transformers caches remote code per folder
    sharded = (llm, ep_mode) == ("internlm2", "cls")
    shard = {"max_shard_size": "1MB"} if sharded else {}  # the sharded layout loads the same
    old_umask = os.umask(0o022)
    try:
        export_to_hf(wrapper, save_dir=str(folder), fp32=True, save_pretrained_kwargs=shard)
    finally:
        os.umask(old_umask)
    assert os.stat(folder).st_mode & 0o777 == 0o755  # readable like any model folder, not mkdtemp's 0700
    shards = sorted(f for f in os.listdir(folder) if f.startswith("model-"))
    if sharded:
        assert len(shards) >= 2 and os.path.isfile(folder / "model.safetensors.index.json")
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    else:
        assert not shards and os.path.isfile(folder / "model.safetensors")
    for name in ("exemplar_errors.py", "exemplar_prompting.py", "exemplar_tsm.py"):  # the training code, verbatim
        assert filecmp.cmp(folder / name, _ep_file(name), shallow=False)

    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, torch_dtype=torch.float32).eval()
    torch.manual_seed(3)
    pixels, tsm_pixels = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32)
    ids, labels, n_prompt, img = prompt_batch(str(folder), model.num_image_token)
    plain, ep, ep_labels = wrapper_logits(wrapper, ids, labels, pixels, tsm_pixels)
    assert not torch.allclose(plain, ep, atol=1e-3)  # the exemplar changes the answer's distribution
    model.img_context_token_id = img
    with torch.no_grad():
        embeds, mask = model.ep_inputs_embeds(ids, torch.ones_like(ids), pixel_values=pixels,
                                              tsm_pixel_values=tsm_pixels)
        exported_ep = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        exported_plain = model(pixel_values=pixels, input_ids=ids, image_flags=torch.ones(1, 1, dtype=torch.long)).logits
    torch.testing.assert_close(rows_of(exported_ep, ep_labels), ep, **PARITY_TOL)
    torch.testing.assert_close(rows_of(exported_plain, labels), plain, **PARITY_TOL)
    # generate: the first new token's scores are the EP logits at the prompt's last position
    scores = model.generate(pixel_values=pixels, input_ids=ids[:, :n_prompt], attention_mask=torch.ones(1, n_prompt),
                            tsm_pixel_values=tsm_pixels, max_new_tokens=1, do_sample=False, output_scores=True,
                            return_dict_in_generate=True).scores[0]
    torch.testing.assert_close(scores[0], ep[0], **PARITY_TOL)
    # what `xtuner-vitask eval` loads: the project's wrapper around the export
    loaded = load_export_model(inspect_export(str(folder), need_ep=True), use_ep=True, torch_dtype="float32")
    loaded_plain, loaded_ep, _ = wrapper_logits(loaded, ids, labels, pixels, tsm_pixels)
    torch.testing.assert_close(loaded_ep, ep, **PARITY_TOL)
    torch.testing.assert_close(loaded_plain, plain, **PARITY_TOL)


def _ep_file(name):
    from xtuner_vitask import ep

    return os.path.join(os.path.dirname(ep.__file__), name)


# ------------------------------------------------------------------------------- slow: real exports
def assert_one_line_refusal(proc, *phrases):
    """pth_to_hf refused: non-zero exit, and stderr ends in one `error: ...` line (no traceback)."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in last, last


@pytest.mark.slow
def test_exports_are_complete_folders(exports, tiny_model):
    base_files = set(os.listdir(tiny_model))
    for variant in ("ep", "plain"):
        folder = exports[variant]
        files = set(os.listdir(folder))
        py = {f for f in base_files if f.endswith(".py")}
        assert py <= files, f"{variant}: remote code missing"
        tokenizer_files = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"}
        for f in py | (tokenizer_files & base_files):
            assert filecmp.cmp(os.path.join(tiny_model, f), os.path.join(folder, f), shallow=False)
        assert {"config.json", "model.safetensors", "task_meta.json", "xtuner_config.py"} <= files
        config = json.load(open(os.path.join(folder, "config.json")))
        assert config["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~_umask()
    plain = json.load(open(os.path.join(exports["plain"], "config.json")))
    base = json.load(open(os.path.join(tiny_model, "config.json")))
    assert plain["auto_map"] == base["auto_map"] and plain["architectures"] == ["InternVLChatModel"]
    assert "vitask" not in plain and not os.path.exists(os.path.join(exports["plain"], "tsm"))
    assert not {"modeling_vitask.py", "exemplar_prompting.py"} & set(os.listdir(exports["plain"]))
    ep = json.load(open(os.path.join(exports["ep"], "config.json")))
    assert ep["auto_map"]["AutoModel"] == "modeling_vitask.VITaskInternVLChatModel"
    assert ep["vitask"]["ep_mode"] == "cls" and ep["vitask"]["exemplar_dim"] == 192
    for name in ("exemplar_errors.py", "exemplar_prompting.py", "exemplar_tsm.py"):
        assert filecmp.cmp(os.path.join(exports["ep"], name), _ep_file(name), shallow=False)
    assert sorted(os.listdir(os.path.join(exports["ep"], "tsm"))) == ["config.json", "model.safetensors"]
    tsm_config = json.load(open(os.path.join(exports["ep"], "tsm", "config.json")))
    assert tsm_config["architecture"] == "vit_tiny_patch16_224" and tsm_config["num_classes"] == 7
    assert tsm_config["vitask_tsm"]["feature_dim"] == 192 and len(tsm_config["vitask_tsm"]["sha256"]) == 64


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_plain_export_chats_like_the_ep_export_without_exemplars(exports):
    """The plain folder (InternVL's own code) and the EP folder with use_ep=False are the same model."""
    plain, tokenizer = load_auto(exports["plain"])
    ep, _ = load_auto(exports["ep"])
    assert type(plain).__name__ == "InternVLChatModel"
    config = dict(max_new_tokens=8, do_sample=False)
    for seed in range(3):
        pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        assert plain.chat(tokenizer, pixels, QUESTION, config) == ep.chat(tokenizer, pixels, QUESTION, config,
                                                                          use_ep=False)


@pytest.mark.slow
def test_ep_export_chats_with_exemplars_from_the_tiles_or_given(exports):
    """The README's `model.chat(...)`: without tsm_pixel_values the TSM input is derived from the last tile
    (from_internvl_tiles); given ones are used as they are; the exemplar reaches the LLM."""
    model, tokenizer = load_auto(exports["ep"])
    assert type(model).__name__ == "VITaskInternVLChatModel" and model.tsm is not None
    assert not any(k.startswith("tsm.") for k in model.state_dict())
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids, _, n_prompt, model.img_context_token_id = prompt_batch(exports["ep"], model.num_image_token)
    ids = ids[:, :n_prompt]

    def first_scores(**kwargs):
        return model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True,
                              **kwargs).scores[0]

    from_tiles = model.tsm.from_internvl_tiles(pixels)
    assert torch.equal(first_scores(), first_scores(tsm_pixel_values=from_tiles))
    assert not torch.allclose(first_scores(), first_scores(use_ep=False))
    other = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(first_scores(tsm_pixel_values=other), first_scores())
    config = dict(max_new_tokens=8, do_sample=False)
    assert model.chat(tokenizer, pixels, QUESTION, config) == model.chat(tokenizer, pixels, QUESTION, config,
                                                                         tsm_pixel_values=from_tiles)


@pytest.mark.slow
def test_plain_weights_equal_the_lora_merged_llm_of_the_trained_wrapper(exports, tiny_model):
    """Rebuild the wrapper from the config with real weights, load the .pth, merge with peft and compare."""
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from export_fixtures import CONFIG
    from conftest import REPO
    from xtuner_vitask.tsm.checkpoint import load_weights_only

    cfg = Config.fromfile(str(REPO / CONFIG))
    cfg.merge_from_dict({k: (None if v == "None" else v) for k, v in (o.split("=", 1) for o in exports["options"])})
    wrapper = BUILDER.build(cfg.model)
    state = load_weights_only(exports["checkpoint"])["state_dict"]  # the training state loads weights-only
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
    assert changed >= 10  # LoRA'd projections (and the trained head) moved away from the base
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
    from xtuner_vitask.tsm.checkpoint import load_weights_only

    tsm_state = load_weights_only(tiny_tsm)["state_dict"]
    exported = load_file(os.path.join(exports["ep"], "tsm", "model.safetensors"))
    assert set(exported) == {k[len("backbone."):] for k in tsm_state if k.startswith("backbone.")}
    for key, value in exported.items():
        assert torch.equal(value, tsm_state[f"backbone.{key}"])


@pytest.mark.slow
def test_pth_to_hf_refusals_are_one_line_and_leave_no_folder(exports, tmp_path, tiny_model, derma_data, tiny_tsm):
    from xtuner_vitask.tsm.checkpoint import load_weights_only

    # a checkpoint of another config (the VITask connector missing)
    state = load_weights_only(exports["checkpoint"])
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("connector.")}
    bad = tmp_path / "vanilla_like.pth"
    torch.save(state, bad)
    proc = pth_to_hf(bad, tmp_path / "out", exports["options"], check=False)
    assert_one_line_refusal(proc, "saved with another config", "connector.")
    assert not (tmp_path / "out").exists()  # pth_to_hf created it; the refusal removed it again
    # a VITask checkpoint with the vanilla recipe's config
    vanilla = ("model.llm=None", f"model.model_path={tiny_model}", f"train_dataloader.dataset.model_path={tiny_model}")
    proc = pth_to_hf(exports["checkpoint"], tmp_path / "out", vanilla, check=False,
                     config=REPO / "configs" / "internvl2_tiny_cpu_lora.py")
    assert_one_line_refusal(proc, "holds VITask's exemplar connector but the config builds the vanilla InternVL2")
    assert not (tmp_path / "out").exists()
    # the training options not repeated (the shipped config's paths do not exist here)
    proc = pth_to_hf(exports["checkpoint"], tmp_path / "out", (), check=False)
    assert_one_line_refusal(proc, "is not a local folder")
    assert not (tmp_path / "out").exists()
    # an output folder with something in it: refused before any work, and left as it was
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    proc = pth_to_hf(exports["checkpoint"], tmp_path / "full", exports["options"], check=False)
    assert_one_line_refusal(proc, "exists and is not empty")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


# ------------------------------------------------------------------------------- slow: plug
def perturbed_tsm(tsm_checkpoint, path):
    """A 'newly trained' TSM: the same architecture with other weights."""
    from xtuner_vitask.tsm.checkpoint import load_weights_only

    state = load_weights_only(tsm_checkpoint)
    gen = torch.Generator().manual_seed(0)
    state["state_dict"] = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if torch.is_tensor(v)
                               and v.is_floating_point() else v) for k, v in state["state_dict"].items()}
    torch.save(state, path)
    return str(path)


def narrower_tsm(path):
    """A TSM checkpoint whose features are 96-d (the connector takes 192-d)."""
    from xtuner_vitask.tsm.model import TaskSpecificModel

    model = TaskSpecificModel("vit_tiny_patch16_224", num_classes=7, img_size=32,
                              model_kwargs=dict(patch_size=4, depth=1, embed_dim=96, num_heads=3))
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


@pytest.mark.slow
def test_plug_swaps_the_tsm_and_keeps_everything_else_bit_identical(exports, tiny_tsm, tmp_path):
    from xtuner_vitask.export.plug import plug_tsm
    from xtuner_vitask.tsm.checkpoint import load_weights_only

    new_tsm = perturbed_tsm(tiny_tsm, tmp_path / "new_tsm.pth")
    out = tmp_path / "plugged_ep"
    record = plug_tsm(exports["ep"], new_tsm, str(out))
    assert record["feature_dim"] == 192
    old_dir = exports["ep"]
    for root, _, files in os.walk(old_dir):
        rel = os.path.relpath(root, old_dir)
        for f in files:
            same = filecmp.cmp(os.path.join(root, f), os.path.join(out, rel, f), shallow=False)
            assert same == (rel != "tsm"), os.path.join(rel, f)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()
    new_weights = load_file(os.path.join(out, "tsm", "model.safetensors"))
    new_state = load_weights_only(new_tsm)["state_dict"]
    assert all(torch.equal(v, new_state[f"backbone.{k}"]) for k, v in new_weights.items())
    model, _ = load_auto(str(out))
    assert torch.equal(model.tsm.backbone.state_dict()["cls_token"], new_state["backbone.cls_token"])


@pytest.mark.slow
def test_plug_refuses_other_feature_sizes_and_plain_exports(exports, tmp_path):
    from xtuner_vitask.export.plug import plug_tsm

    with pytest.raises(VITaskError, match="features have size 96 but the model's connector takes 192"):
        plug_tsm(exports["ep"], narrower_tsm(tmp_path / "narrow.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    with pytest.raises(VITaskError, match="plain export with no TSM"):
        plug_tsm(exports["plain"], narrower_tsm(tmp_path / "narrow.pth"), str(tmp_path / "out2"))
