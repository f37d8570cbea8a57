"""Write a tiny, randomly initialised LLaVA in the layout XTuner's LLaVA recipes start from, offline.

XTuner's LLaVA configs name two hub folders and one file: an InternLM2-chat LLM
(``internlm/internlm2-chat-1_8b``: ``config.json`` with ``auto_map``, InternLM2's remote code, a
SentencePiece tokenizer), a CLIP vision tower with its image processor
(``openai/clip-vit-large-patch14-336``) and the projector of XTuner's pretrain stage
(``iter_2181.pth``, whose ``state_dict`` holds only ``projector.*``). :func:`build_tiny_llava` writes
the same three things, tiny::

    OUT/llm/             InternLM2ForCausalLM from xtuner_vitask/testing/remote_code (the standalone
                         causal LM of InternVL2's tiny: eager attention, legacy tuple caches, head
                         ``output``), InternLM2's slow tokenizer with its chat tokens, generation_config.json
    OUT/visual_encoder/  CLIPVisionModel + CLIPImageProcessor (transformers' own classes)
    OUT/projector_pretrain.pth   {"state_dict": {"projector.model.0.weight": ...}} as XTuner's pretrain saves

so ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(OUT/llm, trust_remote_code=True)``,
``CLIPVisionModel/CLIPImageProcessor.from_pretrained(OUT/visual_encoder)``, XTuner's ``LLaVAModel``
(``pretrained_pth=OUT/projector_pretrain.pth``) and ``xtuner chat OUT/llm --llava ... --visual-encoder
OUT/visual_encoder`` load it. The weights mean nothing; the same arguments give the same files.
"""
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import VITaskError
from .tiny_internvl import (INTERNLM2_AUTO_MAP, INTERNLM2_CHAT_TEMPLATE, INTERNLM2_SP_SYMBOLS, REMOTE_CODE_DIR,
                            _prepare_target, train_sentencepiece_model)

LLM_CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
# CLIP's own normalisation (OpenAI CLIP ViT-L/14-336's preprocessor_config.json)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_llm_tokenizer(folder):
    """InternLM2-chat's kind of tokenizer: slow SentencePiece (remote code), BOS first, pad ``</s>``, its
    chat tokens (``<|im_start|>``, ``<|im_end|>`` ...) whole; no InternVL image tokens (LLaVA uses none)."""
    from .remote_code.tokenization_internlm2 import InternLM2Tokenizer

    vocab_file = Path(folder) / "tokenizer.model"
    vocab_file.write_bytes(train_sentencepiece_model())
    tokenizer = InternLM2Tokenizer(str(vocab_file), additional_special_tokens=INTERNLM2_SP_SYMBOLS[::-1],
                                   model_max_length=32768, chat_template=INTERNLM2_CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)  # tokenizer_config.json with auto_map + tokenization_internlm2.py
    return tokenizer


def llm_config_dict(tokenizer, hidden, num_layers):
    """internlm2-chat's config.json fields at a tiny size (eager attention, dynamic NTK rope, no biases)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>")}
    return dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", auto_map=dict(INTERNLM2_AUTO_MAP),
                vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0},
                rms_norm_eps=1e-5, bias=False, hidden_act="silu", initializer_range=0.02,
                tie_word_embeddings=False, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                pad_token_id=ids["</s>"], attn_implementation="eager", torch_dtype="float32", use_cache=True)


def _write_llm(folder, hidden, num_layers, seed):
    import torch
    from transformers import GenerationConfig

    from .remote_code.configuration_internlm2 import InternLM2Config
    from .remote_code.modeling_internlm2 import InternLM2ForCausalLM

    tokenizer = build_llm_tokenizer(folder)
    config = InternLM2Config(**llm_config_dict(tokenizer, hidden, num_layers))
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(copy.deepcopy(config))
    model.save_pretrained(folder, safe_serialization=True)
    config.save_pretrained(folder)  # the auto_map as written, whatever save_pretrained did with it
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id, im_end],
                     pad_token_id=config.pad_token_id, max_new_tokens=32, do_sample=False).save_pretrained(folder)
    for name in LLM_CODE_FILES:  # transformers loads them from the folder (trust_remote_code)
        shutil.copyfile(REMOTE_CODE_DIR / name, Path(folder) / name)
    written = json.loads((Path(folder) / "config.json").read_text())
    if written.get("auto_map") != INTERNLM2_AUTO_MAP:
        raise RuntimeError(f"{folder}/config.json: auto_map missing after save_pretrained")
    return model


def _write_visual_encoder(folder, image_size, patch_size, hidden, num_layers, seed):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=num_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden, hidden_act="quick_gelu", torch_dtype="float32")
    torch.manual_seed(seed + 1)
    model = CLIPVisionModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True).save_pretrained(folder)
    return model


def _write_projector(path, visual_hidden, llm_hidden, depth, seed):
    """XTuner's pretrain-stage output: a checkpoint whose state_dict holds the projector only."""
    import torch
    from xtuner.model.modules import ProjectorConfig, ProjectorModel

    torch.manual_seed(seed + 2)
    projector = ProjectorModel(ProjectorConfig(visual_hidden_size=visual_hidden, llm_hidden_size=llm_hidden,
                                               depth=depth))
    state = {f"projector.{k}": v for k, v in projector.state_dict().items()}
    torch.save({"state_dict": state, "meta": {"note": "tiny LLaVA pretrain-stage projector (random)"}}, path)


def _apply_umask_tree(folder):
    """The permissions a plain mkdir/open would give (mkdtemp makes the staging folder 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def build_tiny_llava(out_dir, image_size=56, patch_size=14, vision_hidden=64, llm_hidden=64, num_layers=2,
                     projector_depth=2, seed=0, force=False):
    """Write ``out_dir``/{llm, visual_encoder, projector_pretrain.pth} (see the module docstring); returns
    ``out_dir``. ``image_size // patch_size`` squared is the number of image tokens (56/14: 16). The
    folder is written under a temporary name and renamed when complete; an existing non-empty
    ``out_dir`` is replaced only with ``force=True``."""
    out_dir = Path(out_dir).expanduser().absolute()
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
        raise VITaskError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    for name, value in (("vision_hidden", vision_hidden), ("llm_hidden", llm_hidden)):
        if value <= 0 or value % 4:
            raise VITaskError(f"{name} {value} must be a positive multiple of 4 (4 attention heads)")
    if num_layers < 2:
        raise VITaskError(f"num_layers {num_layers} must be at least 2 (LLaVA reads the vision tower's "
                          "second-to-last layer)")
    _prepare_target(out_dir, force)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise VITaskError(f"cannot write into {out_dir.parent}: {exc.strerror}; choose a writable folder") from None
    try:
        (staging / "llm").mkdir()
        (staging / "visual_encoder").mkdir()
        _write_llm(staging / "llm", llm_hidden, num_layers, seed)
        _write_visual_encoder(staging / "visual_encoder", image_size, patch_size, vision_hidden, num_layers, seed)
        _write_projector(staging / "projector_pretrain.pth", vision_hidden, llm_hidden, projector_depth, seed)
        (staging / "README.md").write_text(
            "# Tiny LLaVA for tests (random weights)\n\nWritten by `xtuner-vitask make-tiny --llava`.\n\n"
            f"- llm/: InternLM2ForCausalLM (remote code), hidden {llm_hidden}, {num_layers} layers\n"
            f"- visual_encoder/: CLIPVisionModel, {image_size} px, patch {patch_size}, "
            f"{(image_size // patch_size) ** 2} image tokens\n"
            "- projector_pretrain.pth: XTuner pretrain-stage checkpoint (projector only)\n")
        _apply_umask_tree(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or force=True (checked before)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
