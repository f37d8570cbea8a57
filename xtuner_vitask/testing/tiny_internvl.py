"""Write a tiny, randomly initialised InternVL2-compatible checkpoint folder.

The folder has InternVL2's layout -- ``config.json`` with ``auto_map``, the
remote-code ``.py`` files, ``model.safetensors``, a fast tokenizer and
``generation_config.json`` -- so ``AutoConfig/AutoModel/AutoTokenizer
.from_pretrained(folder, trust_remote_code=True)`` load it offline, and XTuner's
InternVL path, export, chat and evaluation can all be exercised on a CPU in
seconds. The weights mean nothing; the same arguments always give
byte-identical weights.

Choices worth knowing:
- weights are stored in float32 (``torch_dtype: "float32"``; real InternVL2
  says bfloat16) so CPU tests need no casting; loaders may still ask for bf16;
- one tokenizer vocabulary serves every LLM flavour; only bos/eos/pad and the
  BOS post-processor differ (llama adds ``<s>`` like InternLM2's tokenizer);
- the LLM's ``eos_token_id`` is the template's turn-end token, so plain
  ``generate`` stops where ``chat`` would.
"""
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
    "configuration_internvl_chat.py",
    "conversation.py",
    "modeling_intern_vit.py",
    "modeling_internvl_chat.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}

# Per LLM flavour: transformers architecture, default conversation template,
# and the tokenizer's bos/eos/pad (eos = the template's turn-end token).
LLM_FLAVOURS = {
    "qwen2": dict(architecture="Qwen2ForCausalLM", template="Hermes-2",
                  bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    "phi3": dict(architecture="Phi3ForCausalLM", template="phi3-chat",
                 bos="<s>", eos="<|end|>", pad="<|endoftext|>"),
    "llama": dict(architecture="LlamaForCausalLM", template="internlm2-chat",
                  bos="<s>", eos="<|im_end|>", pad="<pad>"),
}
TEMPLATES = ("Hermes-2", "internlm2-chat", "internvl2_5", "phi3-chat")

# Kept whole by the tokenizer. "<pad>" comes first so that id 0 (XTuner's
# collate pad index) is never a real text token.
SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>", "<|endoftext|>",
    "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]
TOKENIZER_VOCAB_SIZE = 1024

# A small built-in corpus: everyday English, the instruction wording of the
# data contract, and typical medical image label names, so prompts and labels
# tokenize into short sequences.
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
""".strip().splitlines()


def _training_corpus():
    # Repeat with light variations so frequent words merge into whole tokens.
    lines = []
    for line in _CORPUS:
        lines += [line, line.lower(), line.upper(), " " + line]
    return lines


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


def build_tokenizer(flavour, template=None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained offline on the built-in corpus."""
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


def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def _llm_config_dict(flavour, tokenizer, llm_hidden, num_layers):
    """A plain transformers config (as a dict, the way config.json stores it)."""
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
    if flavour["architecture"] == "Phi3ForCausalLM":
        config.update(original_max_position_embeddings=2048, sliding_window=None)
    if flavour["architecture"] == "Qwen2ForCausalLM":
        config.update(use_sliding_window=False, max_window_layers=num_layers)
    return config


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


def _readme(llm, template, image_size, patch_size, num_image_token, seed):
    return (
        "# Tiny InternVL2-compatible test checkpoint\n\n"
        "Written by `xtuner-vitask make-tiny` (xtuner_vitask.testing.build_tiny_internvl).\n"
        "Random weights: it exercises code paths offline, it knows nothing.\n\n"
        f"- llm: {llm}, template: {template}, seed: {seed}\n"
        f"- image_size: {image_size}, patch_size: {patch_size}, tokens per tile: {num_image_token}\n"
        "- load: AutoModel.from_pretrained(folder, trust_remote_code=True)\n"
    )


def build_tiny_internvl(
    out_dir,
    llm="qwen2",
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

    ``llm`` picks the transformers LLM class (``qwen2``, ``phi3`` or ``llama``);
    ``template`` defaults to that LLM's InternVL2 conversation template
    (``Hermes-2``, ``phi3-chat``, ``internlm2-chat``). The folder is written
    under a temporary name and renamed when complete; an existing non-empty
    ``out_dir`` is replaced only with ``force=True``. Raises ``VITaskError`` for
    bad arguments or an unwritable location.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    template = template or LLM_FLAVOURS.get(llm, {}).get("template")
    _validate(llm, template, image_size, patch_size, vision_hidden, llm_hidden, num_layers,
              downsample_ratio, max_dynamic_patch)
    _prepare_target(out_dir, force)
    flavour = LLM_FLAVOURS[llm]

    import torch
    from transformers import GenerationConfig

    from .remote_code.configuration_internvl_chat import InternVLChatConfig
    from .remote_code.modeling_internvl_chat import InternVLChatModel

    tokenizer = build_tokenizer(flavour, template)
    llm_config = _llm_config_dict(flavour, tokenizer, llm_hidden, num_layers)
    vision_config = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        architectures=["InternVisionModel"],
        torch_dtype="float32",
    )
    config = InternVLChatConfig(
        vision_config=vision_config,
        llm_config=llm_config,
        select_layer=-1,
        force_image_size=image_size,
        downsample_ratio=downsample_ratio,
        template=template,
        dynamic_image_size=True,
        use_thumbnail=True,
        ps_version="v2",
        min_dynamic_patch=1,
        max_dynamic_patch=max_dynamic_patch,
        use_flash_attn=False,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["InternVLChatModel"],
        auto_map=dict(AUTO_MAP),
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = InternVLChatModel(config).float().eval()
    stop_id = llm_config["eos_token_id"]
    model.generation_config = GenerationConfig(
        bos_token_id=llm_config["bos_token_id"],
        eos_token_id=stop_id,
        pad_token_id=llm_config["pad_token_id"],
        max_new_tokens=32,
        do_sample=False,
    )

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise VITaskError(f"cannot write into {out_dir.parent}: {exc.strerror}; choose a writable folder") from None
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, staging / name)
        (staging / "README.md").write_text(
            _readme(llm, template, image_size, patch_size, model.num_image_token, seed)
        )
        _check_written_config(staging / "config.json")
        _apply_umask(staging)
        if out_dir.exists():
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            else:
                shutil.rmtree(out_dir)  # only reached with force=True (checked above)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


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
