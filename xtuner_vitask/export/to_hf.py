"""``model.to_hf(...)``: a trained InternVL2 / VITask wrapper -> a complete Hugging Face folder.

XTuner's ``xtuner convert pth_to_hf CONFIG PTH OUT`` builds the model from the config on the meta
device, loads only the trained tensors of the .pth into it and calls ``model.to_hf``. So the
frozen towers are not in memory: the export reloads the base checkpoint, applies the trained
LoRA with peft and merges it (``merge_and_unload``), puts the trained ``mlp1`` (and any other
trained tensor) in, and writes:

    config.json (+ auto_map)  model*.safetensors  tokenizer files  generation_config.json
    the base checkpoint's remote-code *.py        task_meta.json (the training data's meta.json)
    vitask_export.json (what was exported, from what)

The EP variant (pth_to_hf's default ``--save-format xtuner``) adds the exemplar connector's
weights, ``modeling_vitask.py`` (a subclass of the base ``InternVLChatModel`` with EP in
``chat``/``generate``), verbatim copies of the EP code it imports (``xtuner_vitask/ep``:
exemplar_errors.py, exemplar_prompting.py, exemplar_tsm.py -- the code training runs) and the
frozen TSM in ``tsm/`` in timm's own folder layout (config.json + model.safetensors; loads with
``timm.create_model("local-dir:tsm")``). ``--save-format official`` (or ``huggingface``) writes the
plain variant: a standard InternVL2 folder that InternVL's own remote code loads, with no TSM
(the point of RDA). Weights above ``--max-shard-size`` are sharded (``model-0000x-of-0000y.safetensors``
+ ``model.safetensors.index.json``). The folder appears complete or not at all, with the mode
the umask gives.
"""
import contextlib
import copy
import json
import os
import shutil
import tempfile

import torch
from mmengine import print_log

from ..ep.exemplar_prompting import feature_kind
from ..errors import VITaskError

EXPORT_FORMAT = "xtuner_vitask.export/1"
EP_FORMATS = ("xtuner",)  # pth_to_hf's default --save-format
PLAIN_FORMATS = ("official", "huggingface")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt")
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
EP_CLASS = "modeling_vitask.VITaskInternVLChatModel"
EP_MODELING_TEMPLATE = os.path.join(os.path.dirname(__file__), "modeling_vitask.py.tmpl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------ checks
def check_trained_tensors_loaded(model):
    """Every tensor the config trains must have come from the checkpoint (pth_to_hf builds on 'meta')."""
    trained = model.state_dict()
    missing = [k for k, v in trained.items() if v.is_meta]
    if missing:
        raise VITaskError(
            f"the checkpoint has no weights for {len(missing)} of the {len(trained)} tensors this config trains "
            f"(e.g. {missing[0]}): it was saved with another config; convert it with the config it was trained with")


# ------------------------------------------------------------------------------------ merging
def _merge_peft(peft_module, fresh_module, what):
    """Apply ``peft_module``'s trained adapter to ``fresh_module`` with peft, and merge it (peft's own merge)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = peft_module.active_adapter
    peft_config = copy.deepcopy(peft_module.peft_config[adapter])
    peft_config.inference_mode = True
    adapter_state = get_peft_model_state_dict(peft_module, adapter_name=adapter)
    wrapped = get_peft_model(fresh_module, peft_config)
    result = set_peft_model_state_dict(wrapped, adapter_state)
    if result.unexpected_keys:
        raise VITaskError(f"the {what} LoRA weights do not fit the base model ({result.unexpected_keys[0]}): "
                          "export with the base checkpoint the model was trained on")
    return wrapped.merge_and_unload()


def merged_base_model(model):
    """The base InternVLChatModel (float32, real weights) with the wrapper's training merged in."""
    from peft import PeftModel
    from transformers import AutoModel

    from ..internvl_config import load_internvl_config

    config = load_internvl_config(model.model_path)
    fresh = AutoModel.from_pretrained(model.model_path, config=config, torch_dtype=torch.float32,
                                      trust_remote_code=True)
    inner = model.model
    if isinstance(inner.language_model, PeftModel):
        fresh.language_model = _merge_peft(inner.language_model, fresh.language_model, "LLM")
    if isinstance(inner.vision_model, PeftModel):
        fresh.vision_model = _merge_peft(inner.vision_model, fresh.vision_model, "vision encoder")
    # mlp1 (XTuner always saves it) and fully trained towers: same names as in the base model
    plain = {k[len("model."):]: v for k, v in model.state_dict().items()
             if k.startswith("model.") and "lora_" not in k and ".base_model.model." not in k}
    result = fresh.load_state_dict(plain, strict=False)
    if result.unexpected_keys:
        raise VITaskError(f"trained tensor {result.unexpected_keys[0]} has no place in the base model "
                          f"{model.model_path}: export with the base checkpoint the model was trained on")
    return fresh.eval()


# ------------------------------------------------------------------------------------ the TSM
def write_tsm_folder(checkpoint, out_dir, config=None, feature_kind="cls"):
    """A trained TSM (mmengine checkpoint) -> ``out_dir`` in timm's folder layout (config.json +
    model.safetensors), loadable with timm alone; xtuner-vitask's record is config.json's
    ``vitask_tsm``. ``config``: the TSM's training config, only for checkpoints that predate the
    identity's ``model_kwargs``. Returns that record."""
    from ..ep.exemplar_tsm import ExemplarTSM
    from ..tsm.checkpoint import load_tsm

    tsm = load_tsm(checkpoint, config=config)
    record = dict(tsm.identity(), feature_dim=tsm.feature_dim, feature_kind=feature_kind,
                  feature_shape=list(tsm.feature_shape(feature_kind)), sha256=tsm.sha256,
                  source_checkpoint=os.path.basename(str(checkpoint)))
    ExemplarTSM(tsm.backbone, tsm.img_size, tsm.mean, tsm.std, info=record).save(out_dir)
    return record


# ------------------------------------------------------------------------------------ files
def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _training_meta_path(model, cfg):
    """The training data's meta.json: model.tsm.meta, else beside the training JSONL."""
    candidates = []
    tsm_cfg = (cfg.get("model") or {}).get("tsm") if cfg is not None else None
    if tsm_cfg and tsm_cfg.get("meta"):
        candidates.append(tsm_cfg["meta"])
    try:
        paths = cfg.train_dataloader.dataset.data_paths
        paths = paths if isinstance(paths, (list, tuple)) else [paths]
        candidates += [os.path.join(os.path.dirname(os.path.abspath(p)), "meta.json") for p in paths]
    except (AttributeError, KeyError, TypeError):
        pass
    return next((p for p in candidates if isinstance(p, str) and os.path.isfile(p)), None)


def _copy_base_files(base, out):
    """Remote code (every *.py), tokenizer files and generation_config.json, verbatim."""
    copied = []
    for name in sorted(os.listdir(base)):
        if name.endswith(".py") or name in TOKENIZER_FILES or name == "generation_config.json":
            shutil.copy2(os.path.join(base, name), os.path.join(out, name))
            copied.append(name)
    if not any(n.endswith(".py") for n in copied):
        raise VITaskError(f"the base model folder {base} has no remote-code .py files (modeling_internvl_chat.py "
                          "...): use a complete InternVL2 download (huggingface-cli download OpenGVLab/InternVL2-2B)")
    return copied


def write_ep_modeling_file(folder, base_class_ref):
    """modeling_vitask.py (the template, importing relatively every file the base modeling file needs)
    and, beside it, verbatim copies of the EP modules it imports (``xtuner_vitask/ep``)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from .. import ep

    base_module = base_class_ref.split("--")[-1].rsplit(".", 1)[0]
    if base_module != "modeling_internvl_chat":
        raise VITaskError(f"the base model's AutoModel is {base_class_ref}, not modeling_internvl_chat."
                          "InternVLChatModel: the EP export supports InternVL2 checkpoints only")
    clash = [m for m in ep.EXPORTED_MODULES if os.path.exists(os.path.join(folder, m + ".py"))]
    if clash:
        raise VITaskError(f"the base model folder has its own {clash[0]}.py, a name the EP code needs: "
                          "export with --save-format official (plain) or rename that file")
    needed = sorted({os.path.splitext(os.path.basename(f))[0]
                    for f in get_relative_import_files(os.path.join(folder, base_module + ".py"))})
    lines = "\n".join(f"from .{name} import __name__ as _{name}  # noqa: F401" for name in needed)
    with open(EP_MODELING_TEMPLATE, encoding="utf-8") as f:
        text = f.read().replace("{relative_imports}", lines)
    with open(os.path.join(folder, "modeling_vitask.py"), "w", encoding="utf-8") as f:
        f.write(text)
    for name in ep.EXPORTED_MODULES:
        shutil.copy2(os.path.join(os.path.dirname(ep.__file__), name + ".py"), os.path.join(folder, name + ".py"))


def _output_dtype(base_config, fp32):
    if fp32:
        return torch.float32
    return DTYPES.get(str(base_config.get("torch_dtype", "bfloat16")), torch.bfloat16)


def umask_mode():
    """The mode a new folder gets from the process umask (``tempfile.mkdtemp`` alone gives 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def new_folder_beside(save_dir, prefix):
    """A temporary folder next to ``save_dir`` (same file system: the final rename is atomic), umask mode."""
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, umask_mode())
    return tmp


def check_output_folder(save_dir):
    """Refuse an output folder with anything in it (pth_to_hf has already created it, maybe empty)."""
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise VITaskError(f"{save_dir} exists and is not empty: remove it or pass another output folder")


def remove_if_empty(folder):
    """Leave no empty output folder behind a refusal (pth_to_hf creates it before calling to_hf)."""
    with contextlib.suppress(OSError):  # not empty, or gone: leave it
        os.rmdir(folder)


def _finish(tmp, save_dir):
    """Move the complete folder into place."""
    check_output_folder(save_dir)
    if os.path.isdir(save_dir):
        os.rmdir(save_dir)
    os.replace(tmp, save_dir)


def export_to_hf(model, cfg=None, save_dir=None, fp32=False, save_pretrained_kwargs=None, save_format="xtuner",
                 **_ignored):
    """Write ``model`` (an ``InternVL2``/``VITaskInternVL`` wrapper) as a Hugging Face folder.

    Args follow XTuner's ``to_hf`` call: ``save_format`` 'xtuner' (default) writes the EP variant
    for VITask models, 'official'/'huggingface' the plain InternVL2 folder; ``fp32`` saves float32
    (else the base checkpoint's own dtype, bfloat16 for InternVL2); weights are always safetensors,
    sharded above ``max_shard_size`` (from ``save_pretrained_kwargs``; pth_to_hf's default 2GB).
    A refusal leaves nothing behind, not even the empty folder pth_to_hf created. Returns ``save_dir``.
    """
    if save_dir is None:
        raise VITaskError("to_hf needs save_dir")
    save_dir = os.path.abspath(str(save_dir))
    check_output_folder(save_dir)  # before minutes of merging, and without removing anything of the user's
    try:
        _export(model, cfg, save_dir, fp32, dict(save_pretrained_kwargs or {}), save_format)
    except BaseException:
        remove_if_empty(save_dir)
        raise
    print_log(f"Export: wrote {save_dir}", logger="current")
    return save_dir


def _export(model, cfg, save_dir, fp32, save_kwargs, save_format):
    if save_format not in EP_FORMATS + PLAIN_FORMATS:
        raise VITaskError(f"--save-format {save_format}: use 'xtuner' (VITask with EP) or 'official' (plain InternVL2)")
    with_ep = hasattr(model, "connector") and save_format in EP_FORMATS
    check_trained_tensors_loaded(model)
    base = model.model_path
    if not os.path.isdir(base):
        raise VITaskError(f"the base model {base} is not a local folder: download it and set model_path to it")
    with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
        base_config = json.load(f)
    dtype = _output_dtype(base_config, fp32)
    if with_ep and getattr(model, "tsm", None) is None:
        raise VITaskError("this model was trained from an exemplar cache and has no TSM to export: set "
                          "model.tsm=dict(checkpoint=...) in the config, or pass --save-format official "
                          "for the plain model")

    print_log(f"Export: merging the trained weights into {base}", logger="current")
    merged = merged_base_model(model)
    state = merged.state_dict()
    if with_ep:
        state.update((f"connector.{k}", v) for k, v in model.connector.state_dict().items())
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    tmp = new_folder_beside(save_dir, ".tmp_export_")
    try:
        merged.save_pretrained(tmp, state_dict=state, safe_serialization=True,
                               max_shard_size=save_kwargs.get("max_shard_size", "5GB"))
        for name in os.listdir(tmp):  # save_pretrained's copies of code/config are replaced below
            if name.endswith(".py"):
                os.remove(os.path.join(tmp, name))
        _copy_base_files(base, tmp)

        config = dict(base_config, torch_dtype=str(dtype).replace("torch.", ""))
        config["auto_map"] = dict(base_config.get("auto_map") or DEFAULT_AUTO_MAP)
        info = dict(format=EXPORT_FORMAT, variant="ep" if with_ep else "plain", base_model=os.path.abspath(base),
                    dtype=config["torch_dtype"], lora_merged=bool(getattr(model, "use_llm_lora", False)))
        meta_path = _training_meta_path(model, cfg)
        if meta_path:
            shutil.copy2(meta_path, os.path.join(tmp, "task_meta.json"))
        info["task_meta"] = "task_meta.json" if meta_path else None
        if with_ep:
            kind = feature_kind(model.ep_mode)
            tsm_cfg = (cfg.get("model") or {}).get("tsm") or {} if cfg is not None else {}
            record = write_tsm_folder(model.tsm.checkpoint_path, os.path.join(tmp, "tsm"),
                                      config=tsm_cfg.get("config"), feature_kind=kind)
            if record["feature_dim"] != model.connector.feature_dim:
                raise VITaskError(f"the TSM's features have size {record['feature_dim']} but the connector takes "
                                  f"{model.connector.feature_dim}: export with the TSM the model was trained with")
            write_ep_modeling_file(tmp, config["auto_map"]["AutoModel"])
            config["architectures"] = ["VITaskInternVLChatModel"]
            config["auto_map"].update(AutoModel=EP_CLASS, AutoModelForCausalLM=EP_CLASS)
            config["vitask"] = dict(ep_mode=model.ep_mode, exemplar_dim=model.connector.feature_dim,
                                    feature_kind=kind, tsm_subfolder="tsm", use_ep_default=True)
            info.update(ep_mode=model.ep_mode, tsm_sha256=record["sha256"])
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "vitask_export.json"), info)
        _finish(tmp, save_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
