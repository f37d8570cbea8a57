"""The InternVL2 wrapper and dataset: CPU-safe loading, every chat template, learning."""
import json

import pytest
import torch
from peft import LoraConfig

from xtuner_vitask.datasets import InternVL2Dataset
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.models import InternVL2
from xtuner_vitask.models.internvl import resolve_attn_implementation

LORA = dict(type=LoraConfig, r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            modules_to_save=["lm_head"],
            task_type="CAUSAL_LM")


def build(model_path, **kw):
    return InternVL2(model_path, freeze_llm=True, freeze_visual_encoder=True, freeze_mlp1=True,
                     attn_implementation="sdpa", torch_dtype="float32", activation_checkpointing=False, **kw)


def test_attention_auto_never_picks_flash_without_cuda():
    assert resolve_attn_implementation("auto") == "sdpa"
    with pytest.raises(VITaskError, match="attn_implementation"):
        resolve_attn_implementation("flash")


def test_missing_and_foreign_model_folders_are_clear_errors(tmp_path):
    with pytest.raises(VITaskError, match="not a local folder"):
        build(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(VITaskError, match="not an InternVL2 checkpoint"):
        build(str(tmp_path))


def test_loads_on_cpu_with_requested_attention(tiny_model):
    model = build(tiny_model, llm_lora=LORA)
    llm_config = model.model.language_model.config
    assert llm_config._attn_implementation == "sdpa"
    assert model.model.vision_model.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("llm", ["qwen2", "phi3", "llama"])
def test_dataset_prompt_matches_the_models_chat_template(tmp_path, llm, derma_data):
    from transformers import AutoTokenizer

    from xtuner_vitask.testing import build_tiny_internvl

    path = build_tiny_internvl(tmp_path / llm, llm=llm)
    ds = InternVL2Dataset(str(path), f"{derma_data}/train.jsonl", dynamic_image_size=False, max_length=512)
    item = ds[0]
    record = ds.data[0]
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    human, gpt = (t["value"] for t in record["conversations"])
    image = "<img>" + "<IMG_CONTEXT>" * ds.patch_token + "</img>"
    messages = [{"role": "system", "content": ds._system},
                {"role": "user", "content": human.replace("<image>", image)},
                {"role": "assistant", "content": gpt}]
    expected = tok.apply_chat_template(messages, tokenize=False)
    # the dataset tokenises with the tokenizer's own BOS (InternLM2 trains that way); the template has none
    got = tok.decode(item["input_ids"], skip_special_tokens=False).removeprefix(tok.bos_token or "")
    assert got.rstrip("\n") == expected.rstrip("\n")
    # only the response (and its end token) is supervised
    supervised = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert tok.decode(supervised).startswith(gpt)


def test_shared_xtuner_template_is_not_edited(tiny_model, derma_data):
    from xtuner.utils import PROMPT_TEMPLATE

    before = dict(PROMPT_TEMPLATE.internlm2_chat)
    InternVL2Dataset(tiny_model, f"{derma_data}/train.jsonl", template=PROMPT_TEMPLATE.internlm2_chat)
    assert dict(PROMPT_TEMPLATE.internlm2_chat) == before


def test_loss_goes_down_on_one_repeated_batch(tiny_model, derma_data):
    from xtuner.dataset.collate_fns import default_collate_fn

    torch.manual_seed(0)
    model = build(tiny_model, llm_lora=LORA)
    ds = InternVL2Dataset(tiny_model, f"{derma_data}/train.jsonl", dynamic_image_size=False, max_length=512)
    batch = default_collate_fn([ds[i] for i in range(4)])["data"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_dataset_bad_files_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(VITaskError, match="does not exist"):
        InternVL2Dataset(tiny_model, str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(VITaskError, match="line 1: needs 'conversations'"):
        InternVL2Dataset(tiny_model, str(bad))
