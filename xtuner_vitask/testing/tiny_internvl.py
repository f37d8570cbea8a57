"""Write randomly initialised InternVL2 checkpoint folders that load offline like OpenGVLab's.

A folder has InternVL2's layout -- ``config.json`` with ``auto_map``, the remote-code ``.py`` files
(``remote_code/``, which mirror InternVL2's on every point this plugin touches), safetensors weights,
the tokenizer files and ``generation_config.json`` -- so ``AutoConfig/AutoModel/AutoTokenizer
.from_pretrained(folder, trust_remote_code=True)`` load it, and XTuner's InternVL path, export, chat and
evaluation run on it on a CPU. The weights mean nothing; the same arguments always give byte-identical
files.

- :func:`build_tiny_internvl`: a tiny model (a few MB, seconds). ``llm="internlm2"`` (default) is
  InternVL2-2B/8B/26B's LLM: InternLM2 from the folder's own remote code, eager or flash attention only,
  legacy tuple caches, InternLM2's SentencePiece tokenizer (a slow tokenizer, remote code) and the
  ``internlm2-chat`` template. ``qwen2`` (InternVL2-1B), ``phi3`` (InternVL2-4B) and ``llama`` use
  transformers' LLM classes and a byte-level BPE fast tokenizer.
- :func:`build_internvl2_preset`: InternVL2-2B's exact architecture (InternViT-300M-448px + InternLM2-1.8B,
  bfloat16), built one tensor at a time and written in shards, never two copies in memory.

The tokenizer is trained offline on a small built-in corpus: its vocabulary (about a thousand pieces)
and token ids are not InternLM2's 92,544 + 9 (see the README, "Tiny checkpoints").
"""
import copy
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from xtuner_vitask.errors import VITaskError

REMOTE_CODE_DIR = Path(__file__).with_name("remote_code")
REMOTE_CODE_FILES = (
    "configuration_intern_vit.py",
    "configuration_internlm2.py",
    "configuration_internvl_chat.py",
    "conversation.py",
    "modeling_intern_vit.py",
    "modeling_internlm2.py",
    "modeling_internvl_chat.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
INTERNLM2_AUTO_MAP = {  # InternVL2's llm_config carries one too
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}

# Per LLM flavour: architecture, default conversation template, and the tokenizer's bos/eos/pad.
# internlm2 keeps InternLM2's own ids (eos = </s>; chat() stops at the template's <|im_end|>); the
# others use the template's turn-end token as eos, so plain generate stops where chat would.
LLM_FLAVOURS = {
    "internlm2": dict(architecture="InternLM2ForCausalLM", template="internlm2-chat",
                      bos="<s>", eos="</s>", pad="</s>"),
    "qwen2": dict(architecture="Qwen2ForCausalLM", template="Hermes-2",
                  bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    "phi3": dict(architecture="Phi3ForCausalLM", template="phi3-chat",
                 bos="<s>", eos="<|end|>", pad="<|endoftext|>"),
    "llama": dict(architecture="LlamaForCausalLM", template="internlm2-chat",
                  bos="<s>", eos="<|im_end|>", pad="<pad>"),
}
DEFAULT_LLM = "internlm2"
TEMPLATES = ("Hermes-2", "internlm2-chat", "internvl2_5", "phi3-chat")

# InternLM2's SentencePiece model holds its chat tokens; InternVL2 adds nine more after its vocabulary.
INTERNLM2_SP_SYMBOLS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
                        "<|im_end|>", "<|im_start|>"]
INTERNVL_ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                         "<box>", "</box>"]
SP_VOCAB_SIZE = 1000

# Byte-level BPE flavours: kept whole by the tokenizer; "<pad>" first so that id 0 (XTuner's collate pad
# index) is never a real text token.
SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>", "<|endoftext|>",
    "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]
TOKENIZER_VOCAB_SIZE = 1024

# A small built-in corpus: everyday English, the instruction wording of the data contract, typical medical
# label names and InternVL's system messages, so prompts and labels tokenize into short sequences.
_CORPUS = """
Analyze the given image for diagnosis. The possible diagnoses are listed below.
Analyze the given dermatoscope image for diagnosis. The possible diagnoses are: a, b, c.
Analyze the given chest X-ray image for diagnosis. Analyze the given retinal OCT image for diagnosis.
Analyze the given pathology image for diagnosis. Analyze the given blood cell microscope image for diagnosis.
Analyze the given breast ultrasound image for diagnosis. Analyze the given fundus camera image for diagnosis.
Analyze the given abdominal CT image for diagnosis. Analyze the given kidney cortex microscope image.
You are a helpful assistant. Please describe the image in detail. What is shown in this picture?
The answer is short. The model answers with the name of one class. There is no finding.
This is a test of a tiny model that runs on a computer without a graphics card.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Hello, how are you today? I am fine, thank you. Yes. No. Maybe. Normal. Abnormal.
The patient has a lesion on the skin. The doctor looks at the scan and writes a report.
One two three four five six seven eight nine ten. First second third. Left right upper lower.
actinic keratoses and intraepithelial carcinoma, basal cell carcinoma, benign keratosis-like lesions,
dermatofibroma, melanoma, melanocytic nevi, vascular lesions, adipose, background, debris, lymphocytes,
mucus, smooth muscle, normal colon mucosa, cancer-associated stroma, colorectal adenocarcinoma epithelium,
atelectasis, cardiomegaly, effusion, infiltration, mass, nodule, pneumonia, pneumothorax, consolidation,
edema, emphysema, fibrosis, pleural, hernia, choroidal neovascularization, diabetic macular edema, drusen,
normal, malignant, benign, basophil, eosinophil, erythroblast, immature granulocytes, lymphocyte, monocyte,
neutrophil, platelet, bladder, femur-left, femur-right, heart, kidney-left, kidney-right, liver, lung-left,
lung-right, pancreas, spleen, no apparent retinopathy, mild, moderate, severe, proliferative retinopathy,
collecting duct, connecting tubule, distal convoluted tubule, glomerular endothelial cells, interstitial
endothelial cells, leukocytes, podocytes, proximal tubule segments, thick ascending limb, ductal carcinoma,
tumor, healthy, disease, grade, stage, positive, negative, present, absent, finding, diagnosis, label.
你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。
你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。
""".strip().splitlines()


def _training_corpus():
    # Repeat with light variations so frequent words merge into whole tokens.
    lines = []
    for line in _CORPUS:
        lines += [line, line.lower(), line.upper(), " " + line]
    lines += ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<image>\n"] * 4
    return lines


# ------------------------------------------------------------------------------------------ tokenizers
def chat_template_for(name):
    """A Jinja chat template that renders the same prompt as ``conversation.get_conv_template(name)``."""
    from .remote_code.conversation import get_conv_template

    conversation = get_conv_template(name)
    system_prefix, system_suffix = conversation.system_template.split("{system_message}")
    user, assistant = conversation.roles
    sep = conversation.sep
    return (
        "{% if messages[0]['role'] == 'system' %}"
        f"{system_prefix}{{{{ messages[0]['content'] }}}}{system_suffix}{sep}"
        f"{{% else %}}{system_prefix}{conversation.system_message}{system_suffix}{sep}{{% endif %}}"
        "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{user}{{{{ message['content'] }}}}{sep}"
        f"{{% elif message['role'] == 'assistant' %}}{assistant}{{{{ message['content'] }}}}{sep}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{assistant}{{% endif %}}"
    )


# InternLM2's own chat template (ChatML with a newline after each turn, BOS first); InternVL2's chat()
# does not use it -- it builds prompts from conversation.py, without those newlines.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_sentencepiece_model(vocab_size=SP_VOCAB_SIZE):
    """Bytes of a BPE SentencePiece model shaped like InternLM2's: <unk> <s> </s> as ids 0-2, its chat
    tokens as whole pieces, byte fallback, whitespace and newlines kept, digits split."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, user_defined_symbols=INTERNLM2_SP_SYMBOLS,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def build_internlm2_tokenizer(folder):
    """InternLM2's slow SentencePiece tokenizer (this package's remote code), written to ``folder``."""
    from .remote_code.tokenization_internlm2 import InternLM2Tokenizer

    vocab_file = Path(folder) / "tokenizer.model"
    vocab_file.write_bytes(train_sentencepiece_model())
    tokenizer = InternLM2Tokenizer(
        str(vocab_file), additional_special_tokens=INTERNLM2_SP_SYMBOLS[::-1] + INTERNVL_ADDED_TOKENS,
        model_max_length=8192, chat_template=INTERNLM2_CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)  # tokenizer_config.json with auto_map, tokenization_internlm2.py
    return tokenizer


def build_tokenizer(flavour, template=None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained offline on the built-in corpus (qwen2/phi3/llama)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer)
    if flavour["bos"] is not None and flavour["architecture"] == "LlamaForCausalLM":
        bos = flavour["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    named = {flavour["bos"], flavour["eos"], flavour["pad"], "<unk>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=flavour["bos"],
        eos_token=flavour["eos"],
        pad_token=flavour["pad"],
        unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in named],
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template_for(template or flavour["template"]),
    )


# ------------------------------------------------------------------------------------------ configs
def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def _llm_config_dict(flavour, tokenizer, llm_hidden, num_layers):
    """The LLM's config as config.json stores it under ``llm_config``."""
    ids = {name: tokenizer.convert_tokens_to_ids(flavour[name]) if flavour[name] else None
           for name in ("bos", "eos", "pad")}
    config = dict(
        architectures=[flavour["architecture"]],
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=llm_hidden,
        intermediate_size=2 * llm_hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        torch_dtype="float32",
        use_cache=True,
    )
    if flavour["architecture"] == "InternLM2ForCausalLM":
        # InternVL2-2B's llm_config: vocabulary = tokenizer size, no biases, dynamic NTK rope, and the
        # flash-attention request it ships with (InternVL's model code turns it into eager without flash-attn)
        config.update(model_type="internlm2", auto_map=dict(INTERNLM2_AUTO_MAP), vocab_size=len(tokenizer),
                      bias=False, rms_norm_eps=1e-5, rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0},
                      attn_implementation="flash_attention_2", hidden_act="silu")
    if flavour["architecture"] == "Phi3ForCausalLM":
        config.update(original_max_position_embeddings=2048, sliding_window=None)
    if flavour["architecture"] == "Qwen2ForCausalLM":
        config.update(use_sliding_window=False, max_window_layers=num_layers)
    return config


def _vision_config_dict(image_size, patch_size, hidden, num_layers, heads, intermediate, dtype_name):
    """InternViT-300M's settings (LayerNorm, qkv bias, no qk-norm, layer scale 1.0) at the given size."""
    return dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", image_size=image_size,
                patch_size=patch_size, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=num_layers, num_attention_heads=heads, qkv_bias=True, qk_normalization=False,
                norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu", initializer_range=0.02,
                initializer_factor=1.0, drop_path_rate=0.0, dropout=0.0, attention_dropout=0.0,
                use_flash_attn=True, torch_dtype=dtype_name)


def _chat_config_dict(vision_config, llm_config, image_size, downsample_ratio, template, max_dynamic_patch,
                      dtype_name):
    return dict(architectures=["InternVLChatModel"], auto_map=dict(AUTO_MAP), model_type="internvl_chat",
                vision_config=vision_config, llm_config=llm_config, select_layer=-1, force_image_size=image_size,
                downsample_ratio=downsample_ratio, template=template, dynamic_image_size=True,
                use_thumbnail=True, ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=max_dynamic_patch,
                use_backbone_lora=0, use_llm_lora=0, torch_dtype=dtype_name)


# InternVL2-2B = InternViT-300M-448px + MLP projector + InternLM2-chat-1.8B (config.json of OpenGVLab/InternVL2-2B).
PRESETS = {
    "internvl2-2b": dict(
        vision=dict(image_size=448, patch_size=14, hidden=1024, num_layers=24, heads=16, intermediate=4096),
        llm=dict(vocab_size=92553, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768,
                 rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-5,
                 bias=False, hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2,
                 pad_token_id=2, tie_word_embeddings=False, use_cache=True),
        downsample_ratio=0.5, template="internlm2-chat", max_dynamic_patch=12, dtype="bfloat16",
    ),
}


def preset_config_dict(preset="internvl2-2b", overrides=None):
    """config.json of ``preset``; ``overrides`` = {"vision": {...}, "llm": {...}} changes sizes (tests)."""
    if preset not in PRESETS:
        raise VITaskError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    spec = copy.deepcopy(PRESETS[preset])
    overrides = overrides or {}
    unknown = set(overrides) - {"vision", "llm"}
    if unknown:
        raise VITaskError(f"preset overrides: unknown part(s) {sorted(unknown)}; use 'vision' and 'llm'")
    spec["vision"].update(overrides.get("vision", {}))
    spec["llm"].update(overrides.get("llm", {}))
    v = spec["vision"]
    vision = _vision_config_dict(v["image_size"], v["patch_size"], v["hidden"], v["num_layers"], v["heads"],
                                 v["intermediate"], spec["dtype"])
    llm = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", auto_map=dict(INTERNLM2_AUTO_MAP),
               attn_implementation="flash_attention_2", torch_dtype=spec["dtype"], **spec["llm"])
    return _chat_config_dict(vision, llm, v["image_size"], spec["downsample_ratio"], spec["template"],
                             spec["max_dynamic_patch"], spec["dtype"])


# ------------------------------------------------------------------------------------------ weights
def _tensor_init(name, module, shape, std, layer_scale):
    """How InternVL2-like weights start: 'zeros' (biases), 'ones' (norm scales), a constant, or normal(std)."""
    from torch import nn

    leaf = name.rsplit(".", 1)[-1]
    is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
    if leaf == "bias":
        return "zeros", None
    if is_norm:
        return "ones", None
    if leaf in ("ls1", "ls2"):
        return "constant", layer_scale
    return "normal", std


def iter_initialized_tensors(model, dtype, seed):
    """(name, tensor) for every parameter of a meta-device ``model``, materialised one at a time.

    Each tensor has its own generator seeded from (seed, its index), so the bytes depend only on the seed
    and the architecture, and at most one tensor (plus its float32 draw) exists at a time.
    """
    import torch

    modules = dict(model.named_modules())
    std = model.config.llm_config.initializer_range
    layer_scale = model.config.vision_config.initializer_factor
    for index, (name, param) in enumerate(model.named_parameters()):
        module = modules[name.rsplit(".", 1)[0]] if "." in name else model
        how, value = _tensor_init(name, module, param.shape, std, layer_scale)
        if how == "zeros":
            tensor = torch.zeros(param.shape, dtype=dtype)
        elif how == "ones":
            tensor = torch.ones(param.shape, dtype=dtype)
        elif how == "constant":
            tensor = torch.full(param.shape, float(value), dtype=dtype)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            tensor = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, value, generator=generator).to(dtype)
        yield name, tensor


def _parse_size(size):
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def write_sharded_safetensors(tensors, folder, max_shard_size, progress=None):
    """Write (name, tensor) pairs as transformers' ``model.safetensors`` or shards + index; returns the size."""
    from safetensors.torch import save_file

    limit, shard, shard_bytes, shards, weight_map, total = _parse_size(max_shard_size), {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"shard-{len(shards):05d}.tmp"
        save_file(shard, str(Path(folder) / name), metadata={"format": "pt"})
        shards.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > limit:
            flush()
        shard[name], shard_bytes, total = tensor, shard_bytes + size, total + size
        if progress is not None:
            progress(size)
    if shard:
        flush()
    if len(shards) == 1:
        os.replace(Path(folder) / shards[0][0], Path(folder) / "model.safetensors")
        return total
    for i, (tmp, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(Path(folder) / tmp, Path(folder) / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# ------------------------------------------------------------------------------------------ checks
def _validate(llm, template, image_size, patch_size, vision_hidden, llm_hidden, num_layers,
              downsample_ratio, max_dynamic_patch):
    if llm not in LLM_FLAVOURS:
        raise VITaskError(f"unknown llm {llm!r}: use one of {', '.join(LLM_FLAVOURS)}")
    if template not in TEMPLATES:
        raise VITaskError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
        raise VITaskError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    fold = round(1 / downsample_ratio) if downsample_ratio > 0 else 0
    if fold < 1 or abs(fold * downsample_ratio - 1) > 1e-6 or (image_size // patch_size) % fold:
        raise VITaskError(
            f"downsample_ratio {downsample_ratio} must be 1/k with k dividing the "
            f"{image_size // patch_size}-patch grid (e.g. 0.5 with an even grid)"
        )
    for name, value in (("vision_hidden", vision_hidden), ("llm_hidden", llm_hidden)):
        if value <= 0 or value % 4:
            raise VITaskError(f"{name} {value} must be a positive multiple of 4 (4 attention heads)")
    if num_layers < 1:
        raise VITaskError(f"num_layers {num_layers} must be at least 1")
    if max_dynamic_patch < 1:
        raise VITaskError(f"max_dynamic_patch {max_dynamic_patch} must be at least 1")


def _prepare_target(out_dir, force):
    """Refuse an existing non-empty target unless ``force``; return the parent folder, created."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise VITaskError(f"{out_dir} exists and is not a folder: pick another output path")
        if any(out_dir.iterdir()) and not force:
            raise VITaskError(f"{out_dir} exists and is not empty: pass force=True (--force) to replace it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VITaskError(f"cannot create {out_dir.parent}: {exc.strerror}; choose a writable folder") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise VITaskError(f"cannot write into {out_dir.parent}: choose a writable folder")


def _readme(what, template, image_size, patch_size, num_image_token, seed):
    return (
        "# InternVL2-compatible test checkpoint (random weights)\n\n"
        "Written by `xtuner-vitask make-tiny` (xtuner_vitask.testing).\n"
        "Random weights: it exercises code paths offline, it knows nothing.\n\n"
        f"- {what}, template: {template}, seed: {seed}\n"
        f"- image_size: {image_size}, patch_size: {patch_size}, tokens per tile: {num_image_token}\n"
        "- load: AutoModel.from_pretrained(folder, trust_remote_code=True)\n"
    )


# ------------------------------------------------------------------------------------------ writing
def _write_folder(out_dir, force, config_dict, make_tokenizer, dtype_name, seed, readme, max_shard_size,
                  progress=False):
    """Build the model on the meta device, write config, weights (tensor by tensor), code and tokenizer
    under a temporary name, then rename to ``out_dir``."""
    import torch
    from transformers import GenerationConfig

    from .remote_code.configuration_internvl_chat import InternVLChatConfig
    from .remote_code.modeling_internvl_chat import InternVLChatModel

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise VITaskError(f"cannot write into {out_dir.parent}: {exc.strerror}; choose a writable folder") from None
    try:
        tokenizer = make_tokenizer(staging)
        config_dict = config_dict(tokenizer) if callable(config_dict) else config_dict
        config = InternVLChatConfig(**copy.deepcopy(config_dict))
        config.save_pretrained(staging)  # as shipped: the LLM's own attention request included
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on the meta device: nothing is allocated
            model = InternVLChatModel(copy.deepcopy(config), use_flash_attn=False)
        dtype = getattr(torch, dtype_name)
        bar = None
        if progress:
            from tqdm import tqdm

            total = sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="weights")
        try:
            write_sharded_safetensors(iter_initialized_tensors(model, dtype, seed), staging, max_shard_size,
                                      progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        llm = config.llm_config
        stops = [llm.eos_token_id]
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if llm.architectures[0] == "InternLM2ForCausalLM" and im_end not in stops:
            stops.append(im_end)  # InternLM2's chat stops at either
        GenerationConfig(bos_token_id=llm.bos_token_id, eos_token_id=stops if len(stops) > 1 else stops[0],
                         pad_token_id=llm.pad_token_id, max_new_tokens=32, do_sample=False).save_pretrained(staging)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, staging / name)
        (staging / "README.md").write_text(readme(model))
        _check_written_config(staging / "config.json")
        _apply_umask(staging)
        if out_dir.exists():
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            else:
                shutil.rmtree(out_dir)  # only reached with force=True (checked before)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def build_tiny_internvl(
    out_dir,
    llm=DEFAULT_LLM,
    image_size=64,
    patch_size=16,
    vision_hidden=64,
    llm_hidden=64,
    num_layers=2,
    downsample_ratio=0.5,
    template=None,
    seed=0,
    max_dynamic_patch=6,
    force=False,
):
    """Write a tiny InternVL2-compatible checkpoint to ``out_dir`` and return its path.

    ``llm``: ``internlm2`` (default; InternVL2-2B's LLM, remote code), ``qwen2``, ``phi3`` or ``llama``;
    ``template`` defaults to that LLM's InternVL2 conversation template (``internlm2-chat``, ``Hermes-2``,
    ``phi3-chat``). Weights are float32. The folder is written under a temporary name and renamed when
    complete; an existing non-empty ``out_dir`` is replaced only with ``force=True``. Raises
    ``VITaskError`` for bad arguments or an unwritable location.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    template = template or LLM_FLAVOURS.get(llm, {}).get("template")
    _validate(llm, template, image_size, patch_size, vision_hidden, llm_hidden, num_layers,
              downsample_ratio, max_dynamic_patch)
    _prepare_target(out_dir, force)
    flavour = LLM_FLAVOURS[llm]

    def make_tokenizer(folder):
        if llm == "internlm2":
            return build_internlm2_tokenizer(folder)
        tokenizer = build_tokenizer(flavour, template)
        tokenizer.save_pretrained(folder)
        return tokenizer

    def config_dict(tokenizer):
        vision = _vision_config_dict(image_size, patch_size, vision_hidden, num_layers, 4, 4 * vision_hidden,
                                     "float32")
        return _chat_config_dict(vision, _llm_config_dict(flavour, tokenizer, llm_hidden, num_layers), image_size,
                                 downsample_ratio, template, max_dynamic_patch, "float32")

    def readme(model):
        return _readme(f"llm: {llm}", template, image_size, patch_size, model.num_image_token, seed)

    return _write_folder(out_dir, force, config_dict, make_tokenizer, "float32", seed, readme, "10GB")


def build_internvl2_preset(out_dir, preset="internvl2-2b", seed=0, force=False, overrides=None,
                           max_shard_size="1GB", progress=True):
    """Write ``preset``'s exact architecture with random bfloat16 weights (InternVL2-2B: about 2.2 B
    parameters, 4.4 GB) and the tiny InternLM2 tokenizer. Tensors are created one at a time and written in
    shards of ``max_shard_size`` (with ``model.safetensors.index.json``), so peak memory stays near one
    shard. ``overrides`` shrink it for tests (see :func:`preset_config_dict`)."""
    out_dir = Path(out_dir).expanduser().absolute()
    config = preset_config_dict(preset, overrides)  # validates the name before anything is written
    _prepare_target(out_dir, force)
    vision = config["vision_config"]

    def readme(model):
        n = sum(p.numel() for p in model.parameters())
        return _readme(f"preset: {preset} ({n / 1e9:.2f} B parameters, bfloat16)", config["template"],
                       vision["image_size"], vision["patch_size"], model.num_image_token, seed)

    return _write_folder(out_dir, force, config, build_internlm2_tokenizer, "bfloat16", seed, readme,
                         max_shard_size, progress=progress)


def _check_written_config(path):
    """Fail loudly if transformers stopped writing what loaders rely on."""
    written = json.loads(path.read_text())
    if written.get("auto_map") != AUTO_MAP or "architectures" not in written.get("llm_config", {}):
        raise RuntimeError(f"{path}: auto_map or llm_config.architectures missing after save_pretrained")


def _apply_umask(folder):
    """Give the staged folder (mkdtemp makes it 0700) the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def folder_size_mb(path):
    """Total size of the files under ``path`` in MB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


if __name__ == "__main__":  # quick manual check: python -m xtuner_vitask.testing.tiny_internvl OUT
    import sys

    start = time.perf_counter()
    folder = build_tiny_internvl(sys.argv[1], force=True)
    print(f"{folder}: {folder_size_mb(folder):.2f} MB in {time.perf_counter() - start:.1f} s")
