"""The tiny InternVL2-compatible checkpoint: loads offline, trains, chats, is reproducible."""
import argparse

import pytest
import torch

from xtuner_vitask.errors import VITaskError
from xtuner_vitask.testing.tiny_internvl import build_tiny_internvl

LLMS = ("qwen2", "phi3", "llama")
DEFAULT_TEMPLATES = {"qwen2": "Hermes-2", "phi3": "phi3-chat", "llama": "internlm2-chat"}


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
    assert config.llm_config.architectures[0].lower().startswith(llm)
    assert config.template == model.template == DEFAULT_TEMPLATES[llm]
    assert (config.force_image_size, config.downsample_ratio, config.ps_version) == (64, 0.5, "v2")
    assert config.dynamic_image_size and config.use_thumbnail and config.select_layer == -1
    # XTuner's InternVL_V1_5_Dataset counts image tokens per tile this way.
    expected = int((config.force_image_size // config.vision_config.patch_size) ** 2 * config.downsample_ratio**2)
    assert model.num_image_token == expected == 4
    assert len(tokenizer) <= config.llm_config.vocab_size
    for token in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>", "<|end|>", "<box>"):
        assert tokenizer.tokenize(f"a{token}b")[1] == token
    assert model.language_model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("llm", LLMS)
def test_forward_backward_and_features(checkpoints, llm):
    _, model, tokenizer = load(checkpoints[llm])
    batch = training_batch(model, tokenizer)
    features = model.extract_feature(batch["pixel_values"])
    assert features.shape == (4, model.num_image_token, model.config.llm_config.hidden_size)
    model.train()
    model.language_model.gradient_checkpointing_enable()  # XTuner always turns it on
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for part in (model.mlp1, model.vision_model, model.language_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_image_flags_skip_blank_tiles(checkpoints):
    _, model, tokenizer = load(checkpoints["qwen2"])
    batch = training_batch(model, tokenizer, tiles=1)
    batch["pixel_values"] = torch.cat([batch["pixel_values"], torch.zeros(1, 3, 64, 64)])
    batch["image_flags"] = torch.tensor([[1], [1], [0]])
    assert torch.isfinite(model(**batch).loss)
    batch["image_flags"] = torch.tensor([[1], [0], [0]])  # too few images for the <IMG_CONTEXT> slots
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model(**batch)


@pytest.mark.parametrize("llm", LLMS)
def test_chat_and_batch_chat_return_text(checkpoints, llm):
    _, model, tokenizer = load(checkpoints[llm])
    model.eval()
    generation = dict(max_new_tokens=4, do_sample=False)
    answer, history = model.chat(tokenizer, torch.randn(2, 3, 64, 64), "What is shown?", generation,
                                 return_history=True)
    assert isinstance(answer, str) and history == [("<image>\nWhat is shown?", answer)]
    follow_up = model.chat(tokenizer, None, "And then?", generation, history=history)
    assert isinstance(follow_up, str)
    answers = model.batch_chat(tokenizer, torch.randn(3, 3, 64, 64), ["a?", "b?"], generation,
                               num_patches_list=[1, 2])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("llm", LLMS)
def test_tokenizer_chat_template_matches_conversation_prompt(checkpoints, llm):
    _, model, tokenizer = load(checkpoints[llm])
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "melanoma"},
                {"role": "user", "content": "Sure?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, prompt = model._build_query("Sure?", [("<image>\nWhat is it?", "melanoma")], [], "", "", "")
    assert rendered == prompt


def test_resaved_model_folder_loads_on_its_own(checkpoints, tmp_path):
    """An export (save_pretrained of the loaded model) carries the remote code and auto_map."""
    _, model, tokenizer = load(checkpoints["llama"])
    model.save_pretrained(tmp_path / "exported")
    tokenizer.save_pretrained(tmp_path / "exported")
    assert (tmp_path / "exported" / "modeling_internvl_chat.py").exists()
    _, reloaded, _ = load(tmp_path / "exported")
    for (name, before), after in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(before, after), name


def test_xtuner_style_flash_request_falls_back_in_bfloat16(checkpoints):
    from transformers import AutoConfig

    folder = checkpoints["phi3"]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.llm_config._attn_implementation = "flash_attention_2"  # what XTuner's InternVL_V1_5 does
    _, model, tokenizer = load(folder, config=config, torch_dtype=torch.bfloat16)
    if not torch.cuda.is_available():
        assert model.language_model.config._attn_implementation != "flash_attention_2"
    assert model.vision_model.dtype == torch.bfloat16
    batch = training_batch(model, tokenizer)
    assert torch.isfinite(model(**batch).loss)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    first = build_tiny_internvl(tmp_path / "a", llm="phi3", seed=3)
    second = build_tiny_internvl(tmp_path / "b", llm="phi3", seed=3)
    other = build_tiny_internvl(tmp_path / "c", llm="phi3", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
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
    assert make_tiny.run(parser.parse_args([str(tmp_path / "t"), "--llm", "llama", "--seed", "1"])) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "t" / "tokenizer.json").exists()
    with pytest.raises(VITaskError, match="not empty"):
        make_tiny.run(parser.parse_args([str(tmp_path / "t")]))
    with pytest.raises(VITaskError, match="unknown llm"):
        make_tiny.run(parser.parse_args([str(tmp_path / "u"), "--llm", "mistral"]))


def test_xtuner_dataset_counts_the_same_image_tokens(checkpoints, tmp_path):
    """XTuner's own InternVL dataset (Phi3 is one of the LLMs it accepts) reads this checkpoint."""
    import copy
    import json

    from PIL import Image
    from xtuner.dataset import InternVL_V1_5_Dataset
    from xtuner.utils import PROMPT_TEMPLATE

    folder = checkpoints["phi3"]
    Image.new("RGB", (28, 28), (120, 30, 60)).save(tmp_path / "a.png")
    record = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nAnalyze the given dermatoscope image for diagnosis."},
        {"from": "gpt", "value": "melanoma"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    template = copy.deepcopy(PROMPT_TEMPLATE.phi3_chat)  # the dataset edits it in place
    dataset = InternVL_V1_5_Dataset(str(folder), template, str(tmp_path / "d.jsonl"),
                                    image_folders=str(tmp_path), max_length=512)
    item = dataset[0]
    _, model, tokenizer = load(folder)
    assert dataset.patch_token == model.num_image_token
    n_context = sum(i == model.img_context_token_id for i in item["input_ids"])
    assert n_context == item["pixel_values"].shape[0] * model.num_image_token
