"""LoRA targets and the trained head, read from the LLM's architecture instead of written per model.

``target_modules="auto"`` is InternVL's own list for the checkpoint's LLM (``wrap_llm_lora`` in
InternVL's ``modeling_internvl_chat.py``); ``modules_to_save="auto"`` (or an "auto" entry in the list) is
the module that ``get_output_embeddings()`` returns -- ``output`` for InternLM2, ``lm_head`` for Qwen2,
Phi3 and Llama. Every target and every ``modules_to_save`` entry must match a module of the LLM: peft
raises for unmatched targets only when none matches, and silently skips ``modules_to_save`` entries
(InternLM2's head would never train), so both are checked here first, with one clear error.
"""
import re

from ..errors import VITaskError

AUTO = "auto"
# InternVL's per-LLM LoRA targets (the lists its own fine-tuning code puts LoRA on).
INTERNVL_LORA_TARGETS = {
    "InternLM2ForCausalLM": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                             "feed_forward.w3"],
    "Phi3ForCausalLM": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "Qwen2ForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
    "LlamaForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
}


def _architecture(llm):
    names = getattr(llm.config, "architectures", None) or [type(llm).__name__]
    return names[0]


def lora_targets_for(llm):
    """InternVL's LoRA target list for this LLM (by its architecture)."""
    arch = _architecture(llm)
    if arch not in INTERNVL_LORA_TARGETS:
        raise VITaskError(f"target_modules='auto': no InternVL LoRA target list for {arch}; "
                          f"name the modules (known: {', '.join(INTERNVL_LORA_TARGETS)})")
    return list(INTERNVL_LORA_TARGETS[arch])


def head_module_name(llm):
    """The LLM's output head, by name (``output`` for InternLM2, ``lm_head`` for most transformers LLMs)."""
    head = llm.get_output_embeddings()
    for name, module in llm.named_modules():
        if module is head:
            return name
    raise VITaskError(f"modules_to_save='auto': {type(llm).__name__} has no output head module")


def _is_auto(value):
    return isinstance(value, str) and value == AUTO


def resolve_lora_config(llm, target_modules, modules_to_save):
    """(target_modules, modules_to_save) with "auto" resolved and every entry checked against ``llm``."""
    if _is_auto(target_modules):
        target_modules = lora_targets_for(llm)
    if _is_auto(modules_to_save):
        modules_to_save = [AUTO]
    if modules_to_save is not None:
        modules_to_save = [head_module_name(llm) if _is_auto(m) else m for m in modules_to_save]
    check_lora_matches(llm, target_modules, modules_to_save)
    return target_modules, modules_to_save


def check_lora_matches(llm, target_modules, modules_to_save):
    """One VITaskError for the first target or modules_to_save entry that matches no module of ``llm``
    (peft's rules: a list entry matches a module named exactly so or ending in '.' + entry; a string is a
    regular expression over full names; a modules_to_save entry matches names that end with it)."""
    from torch import nn

    names = [name for name, _ in llm.named_modules() if name]
    arch = _architecture(llm)
    example = next((n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and "layers." in n), "")
    hint = f"target_modules='auto' gives InternVL's list: {', '.join(INTERNVL_LORA_TARGETS.get(arch, ['?']))}"
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, n) for n in names):
            raise VITaskError(f"llm_lora.target_modules={target_modules!r} (a regular expression) matches no module "
                              f"of {arch} (modules are named like {example!r}); {hint}")
    elif target_modules is not None:
        for target in target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                raise VITaskError(f"llm_lora.target_modules: {target!r} matches no module of {arch} (modules "
                                  f"are named like {example!r}); {hint}")
    for entry in modules_to_save or []:
        if not any(n.endswith(entry) for n in names):
            raise VITaskError(f"llm_lora.modules_to_save: {entry!r} matches no module of {arch}, so it would "
                              f"never be trained; its output head is {head_module_name(llm)!r} "
                              "(modules_to_save='auto' names it)")
