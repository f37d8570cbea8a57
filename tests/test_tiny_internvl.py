"""The InternVL2-compatible test checkpoints: they load offline, train and chat, are reproducible, and
their InternLM2 remote code keeps the contracts of OpenGVLab's InternVL2 code that the plugin meets."""
import argparse
import inspect
import json

import pytest
import torch

from xtuner_vitask.errors import VITaskError
from xtuner_vitask.testing.tiny_internvl import build_internvl2_preset, build_tiny_internvl, preset_config_dict

LLMS = ("internlm2", "qwen2", "phi3", "llama")
DEFAULT_TEMPLATES = {"internlm2": "internlm2-chat", "qwen2": "Hermes-2", "phi3": "phi3-chat",
                     "llama": "internlm2-chat"}
ARCHITECTURES = {"internlm2": "InternLM2ForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {llm: build_tiny_internvl(root / f"tiny-{llm}", llm=llm) for llm in LLMS}


def load(folder, **kwargs):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return config, model, tokenizer


def training_batch(model, tokenizer, tiles=2):
    """Two samples, each one image of ``tiles`` tiles, answer tokens labelled."""
    image = "<img>" + "<IMG_CONTEXT>" * (model.num_image_token * tiles) + "</img>"
    texts = [f"{image}\nAnalyze the given image for diagnosis. melanoma", f"{image}\nWhat is it? nevi"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    labels[:, : labels.shape[1] - 3] = -100
    pixel_values = torch.randn(2 * tiles, 3, 64, 64)
    return dict(pixel_values=pixel_values, input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                labels=labels, image_flags=torch.ones(2 * tiles, 1, dtype=torch.long))


@pytest.mark.parametrize("llm", LLMS)
def test_loads_offline_with_internvl2_layout(checkpoints, llm):
    config, model, tokenizer = load(checkpoints[llm])
    assert type(model).__name__ == "InternVLChatModel" and config.model_type == "internvl_chat"
    assert config.auto_map["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
    assert config.llm_config.architectures[0] == ARCHITECTURES[llm]
    assert type(model.language_model).__name__ == ARCHITECTURES[llm]
    assert config.template == model.template == DEFAULT_TEMPLATES[llm]
    assert (config.force_image_size, config.downsample_ratio, config.ps_version) == (64, 0.5, "v2")
    assert config.dynamic_image_size and config.use_thumbnail and config.select_layer == -1
    # XTuner's InternVL_V1_5_Dataset counts image tokens per tile this way.
    expected = int((config.force_image_size // config.vision_config.patch_size) ** 2 * config.downsample_ratio**2)
    assert model.num_image_token == expected == 4
    assert len(tokenizer) <= config.llm_config.vocab_size
    for token in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>", "<box>"):
        assert tokenizer.tokenize(f"a{token}b")[1] == token


# ---------------------------------------------------------------- InternVL2's InternLM2 remote code
def test_internlm2_refuses_sdpa_and_falls_back_to_eager_without_flash_attn(checkpoints):
    from transformers import AutoConfig

    folder = checkpoints["internlm2"]
    shipped = json.loads((folder / "config.json").read_text())
    assert shipped["llm_config"]["attn_implementation"] == "flash_attention_2"  # as InternVL2-2B ships it
    assert shipped["vision_config"]["use_flash_attn"] is True
    _, model, _ = load(folder)  # use_flash_attn=True by default; flash-attn is not installed here
    lm = model.language_model
    for cls in (type(lm), type(lm.model), type(model), type(model.vision_model)):
        assert not getattr(cls, "_supports_sdpa", False), cls.__name__
    assert type(lm)._supports_flash_attn_2 and not type(lm)._supports_cache_class
    assert lm.config.attn_implementation == "eager" and not model.config.vision_config.use_flash_attn
    assert type(lm.model.layers[0].attention).__name__ == "InternLM2Attention"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.llm_config._attn_implementation = "sdpa"  # what a generic loader does for "sdpa"
    with pytest.raises(ValueError, match="InternLM2ForCausalLM does not support an attention implementation "
                                         "through torch.nn.functional.scaled_dot_product_attention"):
        load(folder, config=config)


def test_internlm2_parameter_names_and_fused_grouped_wqkv(checkpoints):
    _, model, _ = load(checkpoints["internlm2"])
    names = {n for n, _ in model.named_parameters()}
    lm = model.language_model
    for name in ("language_model.model.tok_embeddings.weight", "language_model.output.weight",
                 "language_model.model.norm.weight", "language_model.model.layers.0.attention.wqkv.weight",
                 "language_model.model.layers.0.attention.wo.weight", "language_model.model.layers.0.attention_norm.weight",
                 "language_model.model.layers.0.ffn_norm.weight", "vision_model.encoder.layers.0.attn.qkv.weight",
                 "vision_model.encoder.layers.0.ls1", "mlp1.1.weight"):
        assert name in names, name
    for w in ("w1", "w2", "w3"):
        assert f"language_model.model.layers.0.feed_forward.{w}.weight" in names
    assert not [n for n in names if "lm_head" in n or "q_proj" in n or "bias" in n and "language_model" in n]
    assert lm.get_output_embeddings() is lm.output and lm.get_input_embeddings() is lm.model.tok_embeddings
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert lm.model.layers[0].attention.wqkv.weight.shape == (
        (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim, cfg.hidden_size)

    # wqkv's rows, per key/value head: its query heads, then its key, then its value (InternLM2's layout)
    attn = lm.model.layers[0].attention.eval()
    x = torch.randn(1, 5, cfg.hidden_size)
    groups = attn.wqkv(x).view(1, 5, cfg.num_key_value_heads, -1, head_dim)
    q = groups[..., :-2, :].reshape(1, 5, cfg.num_attention_heads, head_dim).transpose(1, 2)
    k, v = groups[..., -2, :].transpose(1, 2), groups[..., -1, :].transpose(1, 2)
    cos, sin = attn.rotary_emb(v, seq_len=5)
    rotate = lambda t: torch.cat([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1)  # noqa: E731
    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = attn.wo(expected.transpose(1, 2).reshape(1, 5, cfg.hidden_size))
    mask = torch.full((5, 5), torch.finfo(x.dtype).min).triu(1)[None, None]
    got, _, _ = attn(x, attention_mask=mask, position_ids=torch.arange(5)[None])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_internlm2_kv_caches_are_legacy_tuples_in_and_out(checkpoints):
    from transformers.cache_utils import DynamicCache

    _, model, _ = load(checkpoints["internlm2"])
    lm = model.language_model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    prefix = lm(input_ids=ids[:, :3], attention_mask=mask[:, :3], position_ids=positions[:, :3], use_cache=True)
    past = prefix.past_key_values
    assert isinstance(past, tuple) and len(past) == lm.config.num_hidden_layers
    assert all(isinstance(layer, tuple) and len(layer) == 2 for layer in past)
    full = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for given in (past, DynamicCache.from_legacy_cache(past)):  # a Cache object goes in, a tuple comes out
        rest = lm(input_ids=ids[:, 3:], attention_mask=mask, position_ids=positions[:, 3:], past_key_values=given,
                  use_cache=True)
        assert isinstance(rest.past_key_values, tuple) and rest.past_key_values[0][0].shape[2] == 5
        torch.testing.assert_close(rest.logits, full[:, 3:], atol=1e-5, rtol=1e-4)
    assert not lm._supports_default_dynamic_cache()  # generate() hands it tuples too


def test_internvit_switches_on_its_own_gradient_checkpointing(checkpoints, monkeypatch):
    _, model, _ = load(checkpoints["internlm2"])
    vit = model.vision_model
    assert vit.encoder.gradient_checkpointing is True and not type(vit).supports_gradient_checkpointing
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    pixels = torch.randn(2, 3, 64, 64)
    vit.eval()(pixel_values=pixels)
    assert calls == []
    vit.train()(pixel_values=pixels)
    assert len(calls) == len(vit.encoder.layers)


def test_internlm2_tokenizer_is_internlm2s_slow_sentencepiece_tokenizer(checkpoints):
    folder = checkpoints["internlm2"]
    _, model, tokenizer = load(folder)
    assert type(tokenizer).__name__ == "InternLM2Tokenizer" and not tokenizer.is_fast
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
    assert (folder / "tokenizer.model").exists() and (folder / "tokenization_internlm2.py").exists()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "</s>"
    ids = tokenizer("hello").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id  # BOS in front, no EOS
    assert tokenizer.encode("hello", add_special_tokens=False) == ids[1:]
    # InternLM2's chat tokens are in the SentencePiece vocabulary; InternVL2's image tokens come after it
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") < tokenizer.vocab_size
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") >= tokenizer.vocab_size
    assert model.config.llm_config.vocab_size == len(tokenizer)
    assert tokenizer.decode(tokenizer.encode("melanocytic nevi"), skip_special_tokens=True) == "melanocytic nevi"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == "<s><|im_start|>user\nhi<|im_end|>\n" \
                                                                       "<|im_start|>assistant\n"


def test_internlm2_chat_template_is_internvls_conversation(checkpoints):
    _, model, _ = load(checkpoints["internlm2"])
    assert model.system_message.startswith("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型")
    conv = model.conv_template
    assert (conv.sep, conv.roles) == ("<|im_end|>", ("<|im_start|>user\n", "<|im_start|>assistant\n"))
    conv.append_message(conv.roles[0], "q")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (f"<|im_start|>system\n{model.system_message}<|im_end|>"
                                 "<|im_start|>user\nq<|im_end|><|im_start|>assistant\n")


def test_chat_batch_chat_and_generate_keep_internvl2s_signatures_and_side_effects(checkpoints):
    _, model, tokenizer = load(checkpoints["internlm2"])
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(model.chat) == ["tokenizer", "pixel_values", "question", "generation_config", "history",
                                  "return_history", "num_patches_list", "IMG_START_TOKEN", "IMG_END_TOKEN",
                                  "IMG_CONTEXT_TOKEN", "verbose"]
    assert params(model.batch_chat) == ["tokenizer", "pixel_values", "questions", "generation_config",
                                        "num_patches_list", "history", "return_history", "IMG_START_TOKEN",
                                        "IMG_END_TOKEN", "IMG_CONTEXT_TOKEN", "verbose", "image_counts"]
    assert params(model.generate) == ["pixel_values", "input_ids", "attention_mask", "visual_features",
                                      "generation_config", "output_hidden_states", "return_dict", "generate_kwargs"]
    assert params(type(model).__init__)[-1] == "use_flash_attn"
    model.eval()
    generation = dict(max_new_tokens=3, do_sample=False)
    history = []  # a history (even an empty one) means: no "<image>" is added to the question
    model.chat(tokenizer, torch.randn(1, 3, 64, 64), "<image>\nWhat is it?", generation, history=history)
    # InternVL2 writes the template's stop token into the caller's dict and appends to the caller's history
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(history) == 1
    model.batch_chat(tokenizer, torch.randn(2, 3, 64, 64), ["a?", "b?"], dict(generation), num_patches_list=[1, 1])
    assert tokenizer.padding_side == "left"
    # InternVL2 forwards return_dict to the LLM's generate; InternLM2's own generation inputs drop it
    ids = tokenizer("<img>" + "<IMG_CONTEXT>" * model.num_image_token + "</img>", return_tensors="pt")
    out = model.generate(torch.randn(1, 3, 64, 64), ids.input_ids, ids.attention_mask, return_dict=None,
                         max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 2  # new tokens only: the prompt went in as embeddings


@pytest.mark.parametrize("llm", LLMS)
def test_forward_backward_and_features(checkpoints, llm):
    _, model, tokenizer = load(checkpoints[llm])
    batch = training_batch(model, tokenizer)
    features = model.extract_feature(batch["pixel_values"])
    assert features.shape == (4, model.num_image_token, model.config.llm_config.hidden_size)
    model.train()
    model.language_model.gradient_checkpointing_enable()  # XTuner always turns it on
    model.language_model.enable_input_require_grads()  # as XTuner does: reentrant checkpoints need it
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for part in (model.mlp1, model.vision_model, model.language_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_image_flags_skip_blank_tiles(checkpoints):
    _, model, tokenizer = load(checkpoints["internlm2"])
    batch = training_batch(model, tokenizer, tiles=1)
    batch["pixel_values"] = torch.cat([batch["pixel_values"], torch.zeros(1, 3, 64, 64)])
    batch["image_flags"] = torch.tensor([[1], [1], [0]])
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0
    batch["image_flags"] = torch.tensor([[1], [0], [0]])  # too few images for the <IMG_CONTEXT> slots
    with pytest.warns(UserWarning, match="IMG_CONTEXT"):
        assert model(**batch).loss == 0  # InternVL2 zeroes the loss of a batch it cannot fill


@pytest.mark.parametrize("llm", LLMS)
def test_chat_and_batch_chat_return_text(checkpoints, llm):
    _, model, tokenizer = load(checkpoints[llm])
    model.eval()
    answer, history = model.chat(tokenizer, torch.randn(2, 3, 64, 64), "What is shown?",
                                 dict(max_new_tokens=4, do_sample=False), return_history=True)
    assert isinstance(answer, str) and history == [("<image>\nWhat is shown?", answer)]
    follow_up = model.chat(tokenizer, None, "And then?", dict(max_new_tokens=4, do_sample=False), history=history)
    assert isinstance(follow_up, str)
    answers = model.batch_chat(tokenizer, torch.randn(3, 3, 64, 64), ["a?", "b?"],
                               dict(max_new_tokens=4, do_sample=False), num_patches_list=[1, 2])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("llm", ["qwen2", "phi3", "llama"])
def test_tokenizer_chat_template_matches_conversation_prompt(checkpoints, llm):
    from transformers import AutoTokenizer

    folder = checkpoints[llm]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    _, model, _ = load(folder)
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "melanoma"},
                {"role": "user", "content": "Sure?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    conv = model.conv_template
    for role, text in zip((0, 1, 0, 1), ("<image>\nWhat is it?", "melanoma", "Sure?", None)):
        conv.append_message(conv.roles[role], text)
    assert rendered == conv.get_prompt()


def test_resaved_model_folder_lacks_the_modeling_code(checkpoints, tmp_path):
    """As with InternVL2's code, save_pretrained copies only the config code: exports must add the rest."""
    _, model, _ = load(checkpoints["internlm2"])
    model.save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved" / "modeling_internvl_chat.py").exists()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    for llm in ("internlm2", "phi3"):
        first = build_tiny_internvl(tmp_path / f"a-{llm}", llm=llm, seed=3)
        second = build_tiny_internvl(tmp_path / f"b-{llm}", llm=llm, seed=3)
        other = build_tiny_internvl(tmp_path / f"c-{llm}", llm=llm, seed=4)
        tokenizer_file = "tokenizer.model" if llm == "internlm2" else "tokenizer.json"
        for name in ("model.safetensors", tokenizer_file, "config.json", "tokenizer_config.json"):
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
        assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_same_folder_name_different_checkpoints_in_one_process(tmp_path):
    # transformers keys its copy of remote code by the folder's base name.
    qwen = build_tiny_internvl(tmp_path / "one" / "tiny", llm="qwen2")
    phi = build_tiny_internvl(tmp_path / "two" / "tiny", llm="phi3", image_size=96)
    _, qwen_model, _ = load(qwen)
    _, phi_model, _ = load(phi)
    assert type(qwen_model.language_model).__name__ == "Qwen2ForCausalLM"
    assert type(phi_model.language_model).__name__ == "Phi3ForCausalLM"
    assert phi_model.num_image_token == 9


# ---------------------------------------------------------------- the InternVL2-2B preset
def test_internvl2_2b_preset_has_the_real_architecture():
    config = preset_config_dict("internvl2-2b")
    vision, llm = config["vision_config"], config["llm_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"],
            vision["num_attention_heads"], vision["intermediate_size"], vision["norm_type"]) == \
           (448, 14, 1024, 24, 16, 4096, "layer_norm")
    assert (llm["architectures"], llm["vocab_size"], llm["hidden_size"], llm["intermediate_size"],
            llm["num_hidden_layers"], llm["num_attention_heads"], llm["num_key_value_heads"]) == \
           (["InternLM2ForCausalLM"], 92553, 2048, 8192, 24, 16, 8)
    assert (llm["rope_theta"], llm["rope_scaling"], llm["bias"]) == (1000000, {"type": "dynamic", "factor": 2.0}, False)
    assert (config["template"], config["force_image_size"], config["downsample_ratio"], config["ps_version"],
            config["max_dynamic_patch"], config["torch_dtype"]) == ("internlm2-chat", 448, 0.5, "v2", 12, "bfloat16")
    with pytest.raises(VITaskError, match="unknown preset"):
        preset_config_dict("internvl2-76b")


def test_preset_builds_lean_in_bf16_shards_and_loads(tmp_path):
    """The preset's builder, shrunk: one tensor at a time, several shards + index, bf16, loadable."""
    small = dict(vision=dict(image_size=56, hidden=32, num_layers=1, heads=2, intermediate=64),
                 llm=dict(vocab_size=1100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2))
    folder = build_internvl2_preset(tmp_path / "small", overrides=small, max_shard_size="60KB", progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).exists() for s in shards)
    config, model, tokenizer = load(folder, torch_dtype="auto")
    assert model.language_model.dtype == torch.bfloat16 and model.vision_model.dtype == torch.bfloat16
    assert sum(p.numel() * 2 for p in model.parameters()) == index["metadata"]["total_size"]
    assert set(index["weight_map"]) == set(model.state_dict())
    assert config.llm_config.num_key_value_heads == 2 and model.num_image_token == 4
    answer = model.float().chat(tokenizer, torch.randn(1, 3, 56, 56), "What is it?",
                                dict(max_new_tokens=2, do_sample=False))
    assert isinstance(answer, str)


# ---------------------------------------------------------------- errors and the CLI
def test_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(VITaskError, match="unknown llm 'gpt9'"):
        build_tiny_internvl(tmp_path / "x", llm="gpt9")
    with pytest.raises(VITaskError, match="multiple of patch_size"):
        build_tiny_internvl(tmp_path / "x", image_size=50)
    with pytest.raises(VITaskError, match="unknown template"):
        build_tiny_internvl(tmp_path / "x", template="vicuna")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(VITaskError, match="not empty.*--force"):
        build_tiny_internvl(occupied)
    assert (occupied / "keep.txt").exists()
    build_tiny_internvl(occupied, force=True)
    assert not (occupied / "keep.txt").exists() and (occupied / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    (tmp_path / "empty").mkdir()
    assert (build_tiny_internvl(tmp_path / "empty") / "model.safetensors").exists()


def test_unwritable_location_is_a_vitask_error(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(VITaskError, match="writable"):
        build_tiny_internvl(not_a_folder / "tiny")
    with pytest.raises(VITaskError, match="not a folder"):
        build_tiny_internvl(not_a_folder)


def test_cli_subcommand(tmp_path, capsys):
    from xtuner_vitask.cli import make_tiny

    parser = argparse.ArgumentParser()
    make_tiny.add_arguments(parser)
    assert make_tiny.run(parser.parse_args([str(tmp_path / "t")])) == 0
    assert "internlm2" in capsys.readouterr().out and (tmp_path / "t" / "tokenizer.model").exists()
    assert make_tiny.run(parser.parse_args([str(tmp_path / "l"), "--llm", "llama", "--seed", "1"])) == 0
    assert (tmp_path / "l" / "tokenizer.json").exists()
    with pytest.raises(VITaskError, match="not empty"):
        make_tiny.run(parser.parse_args([str(tmp_path / "t")]))
    with pytest.raises(VITaskError, match="unknown llm"):
        make_tiny.run(parser.parse_args([str(tmp_path / "u"), "--llm", "mistral"]))
    with pytest.raises(SystemExit):  # argparse refuses an unknown preset
        parser.parse_args([str(tmp_path / "p"), "--preset", "internvl2-76b"])


def test_xtuner_dataset_counts_the_same_image_tokens(checkpoints, tmp_path):
    """XTuner's own InternVL dataset (InternLM2 is one of the LLMs it accepts) reads this checkpoint."""
    import copy

    from PIL import Image
    from xtuner.dataset import InternVL_V1_5_Dataset
    from xtuner.utils import PROMPT_TEMPLATE

    folder = checkpoints["internlm2"]
    Image.new("RGB", (28, 28), (120, 30, 60)).save(tmp_path / "a.png")
    record = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nAnalyze the given dermatoscope image for diagnosis."},
        {"from": "gpt", "value": "melanoma"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    template = copy.deepcopy(PROMPT_TEMPLATE.internlm2_chat)  # the dataset edits it in place
    dataset = InternVL_V1_5_Dataset(str(folder), template, str(tmp_path / "d.jsonl"),
                                    image_folders=str(tmp_path), max_length=512)
    item = dataset[0]
    _, model, tokenizer = load(folder)
    assert dataset.patch_token == model.num_image_token
    n_context = sum(i == model.img_context_token_id for i in item["input_ids"])
    assert n_context == item["pixel_values"].shape[0] * model.num_image_token
    assert item["input_ids"][0] == tokenizer.bos_token_id
