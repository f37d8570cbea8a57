"""The InternVL2 wrapper and dataset: attention per LLM, LoRA targets and head from the architecture,
every chat template, learning -- on InternVL2's InternLM2 code by default, and on Qwen2 and Phi3."""
import json

import pytest
import torch
from peft import LoraConfig

from xtuner_vitask.datasets import InternVL2Dataset
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.models import InternVL2
from xtuner_vitask.models import attention
from xtuner_vitask.models.internvl import load_internvl_config
from xtuner_vitask.models.lora import INTERNVL_LORA_TARGETS

LORA = dict(type=LoraConfig, r=16, lora_alpha=32, lora_dropout=0.0, target_modules="auto", modules_to_save="auto",
            task_type="CAUSAL_LM")


def build(model_path, **kw):
    kw = dict(dict(attn_implementation="auto", activation_checkpointing=False), **kw)
    return InternVL2(model_path, freeze_llm=True, freeze_visual_encoder=True, freeze_mlp1=True,
                     torch_dtype="float32", **kw)


# ---------------------------------------------------------------- attention per LLM
def test_auto_attention_is_the_best_the_llm_code_supports(tiny_model, tiny_model_qwen2, monkeypatch):
    internlm2, qwen2 = load_internvl_config(tiny_model), load_internvl_config(tiny_model_qwen2)
    assert attention.supported_attn_implementations(internlm2, tiny_model) == \
        ("InternLM2ForCausalLM", ("eager", "flash_attention_2"))  # InternVL2's InternLM2: no SDPA
    assert attention.resolve_attn_implementation("auto", internlm2, tiny_model) == "eager"
    assert attention.resolve_attn_implementation("auto", qwen2, tiny_model_qwen2) == "sdpa"
    assert attention.resolve_attn_implementation("eager", qwen2, tiny_model_qwen2) == "eager"
    monkeypatch.setattr(attention, "flash_attention_usable", lambda: True)  # a GPU with flash-attn
    assert attention.resolve_attn_implementation("auto", internlm2, tiny_model) == "flash_attention_2"
    assert attention.resolve_attn_implementation("auto", qwen2, tiny_model_qwen2) == "flash_attention_2"


def test_an_attention_the_llm_cannot_do_is_one_clear_error(tiny_model):
    config = load_internvl_config(tiny_model)
    with pytest.raises(VITaskError, match=r"'sdpa': InternLM2ForCausalLM .* does not support it; "
                                          r"choices that work here: 'auto', 'eager'$"):
        attention.resolve_attn_implementation("sdpa", config, tiny_model)
    with pytest.raises(VITaskError, match="needs flash-attn installed and a CUDA GPU"):
        attention.resolve_attn_implementation("flash_attention_2", config, tiny_model)
    with pytest.raises(VITaskError, match="attn_implementation='flash'"):
        attention.resolve_attn_implementation("flash", config, tiny_model)
    with pytest.raises(VITaskError, match="InternLM2ForCausalLM"):  # the wrapper checks before loading
        build(tiny_model, attn_implementation="sdpa")


def test_loaders_load_internlm2_with_eager_attention(tiny_model):
    model = build(tiny_model, llm_lora=LORA)
    lm = model.model.language_model.get_base_model()
    assert model.attn_implementation == "eager"
    # InternVL2's model code was told use_flash_attn=False; XTuner's flash request did not survive
    assert lm.config.attn_implementation == "eager" and lm.config._attn_implementation == "eager"
    assert type(lm.model.layers[0].attention).__name__ == "InternLM2Attention"
    assert model.model.config.vision_config.use_flash_attn is False
    config, implementation, kwargs = attention.prepare_attention(tiny_model, "auto")  # chat, plain loaders
    assert implementation == "eager" and kwargs == {"use_flash_attn": False}
    assert config.llm_config._attn_implementation == "eager"


def test_missing_and_foreign_model_folders_are_clear_errors(tmp_path):
    with pytest.raises(VITaskError, match="not a local folder"):
        build(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(VITaskError, match="not an InternVL2 checkpoint"):
        build(str(tmp_path))


# ---------------------------------------------------------------- LoRA targets and the head
@pytest.mark.parametrize("which,head", [("internlm2", "output"), ("qwen2", "lm_head"), ("phi3", "lm_head")])
def test_auto_lora_targets_and_head_follow_the_architecture(which, head, request):
    path = request.getfixturevalue({"internlm2": "tiny_model", "qwen2": "tiny_model_qwen2",
                                    "phi3": "tiny_model_phi3"}[which])
    model = build(path, llm_lora=LORA)
    arch = load_internvl_config(path).llm_config.architectures[0]
    assert model.lora_target_modules == INTERNVL_LORA_TARGETS[arch] and model.lora_modules_to_save == [head]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    for target in INTERNVL_LORA_TARGETS[arch]:
        assert any(f".{target}.lora_A." in n for n in trainable), target
    assert any(f".{head}.modules_to_save." in n for n in trainable)  # the head trains and is saved
    assert any(f".{head}.modules_to_save." in k for k in model.state_dict())


def test_lora_entries_that_match_nothing_are_errors_before_training(tiny_model):
    qwen_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(VITaskError, match=r"target_modules: 'q_proj' matches no module of InternLM2ForCausalLM.*"
                                          r"attention\.wqkv"):
        build(tiny_model, llm_lora=dict(LORA, target_modules=qwen_names))
    with pytest.raises(VITaskError, match=r"modules_to_save: 'lm_head' matches no module of InternLM2ForCausalLM, "
                                          r"so it would never be trained; its output head is 'output'"):
        build(tiny_model, llm_lora=dict(LORA, modules_to_save=["lm_head"]))
    with pytest.raises(VITaskError, match="a regular expression"):
        build(tiny_model, llm_lora=dict(LORA, target_modules=r".*\.q_proj"))


def test_activation_checkpointing_keeps_lora_gradients_on_internlm2(tiny_model, derma_data):
    """InternLM2's reentrant checkpointing needs inputs that require grad (XTuner's hook gives them)."""
    from xtuner.dataset.collate_fns import default_collate_fn

    model = build(tiny_model, llm_lora=LORA, activation_checkpointing=True).train()
    assert model.model.language_model.get_base_model().model.gradient_checkpointing
    ds = InternVL2Dataset(tiny_model, f"{derma_data}/train.jsonl", dynamic_image_size=False, max_length=512)
    model(default_collate_fn([ds[0], ds[1]])["data"])["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    first_layer = [g for n, g in grads.items() if ".layers.0." in n and "lora_B" in n]
    assert first_layer and all(g is not None and g.abs().sum() > 0 for g in first_layer)


# ---------------------------------------------------------------- dataset
@pytest.mark.parametrize("llm", ["internlm2", "qwen2", "phi3", "llama"])
def test_dataset_prompt_is_internvls_conversation_prompt(tmp_path, llm, derma_data):
    """Training tokens = the prompt InternVL2's own chat() builds (conversation.py), answer, turn end."""
    from transformers import AutoModel, AutoTokenizer

    from xtuner_vitask.testing import build_tiny_internvl

    path = build_tiny_internvl(tmp_path / llm, llm=llm)
    ds = InternVL2Dataset(str(path), f"{derma_data}/train.jsonl", dynamic_image_size=False, max_length=512)
    item = ds[0]
    human, gpt = (t["value"] for t in ds.data[0]["conversations"])
    conv = AutoModel.from_pretrained(path, trust_remote_code=True).conv_template  # the model's own template
    conv.append_message(conv.roles[0], human.replace("<image>", "<img>" + "<IMG_CONTEXT>" * ds.patch_token
                                                     + "</img>"))
    conv.append_message(conv.roles[1], gpt)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    expected = tok(conv.get_prompt()).input_ids  # InternLM2 puts <s> first, as its training does
    assert item["input_ids"] == expected[:len(item["input_ids"])] and len(expected) - len(item["input_ids"]) <= 1
    supervised = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert tok.decode(supervised, skip_special_tokens=True).strip() == gpt


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
