"""Export folders: what is in one (:func:`inspect_export`), one clear error when something is
missing (loading one into the project's wrappers: :func:`xtuner_vitask.inference.exports.load_export_model`)."""
import json
import os
from dataclasses import dataclass, field

from ..contract import load_meta
from ..errors import VITaskError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # one file, or shards + index (either is loaded)
TSM_FILES = ("config.json", "model.safetensors")  # timm's folder layout
EP_CODE_FILES = ("modeling_internvl_chat.py", "exemplar_errors.py", "exemplar_prompting.py", "exemplar_tsm.py")


@dataclass
class ExportInfo:
    """What an export (or any InternVL2) folder holds."""
    path: str
    config: dict
    has_ep: bool
    tsm_dir: str | None = None
    task_meta: dict | None = None
    export: dict = field(default_factory=dict)

    @property
    def vitask(self):
        return self.config.get("vitask") or {}


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise VITaskError(f"cannot read {what} {path} ({type(err).__name__}): re-export the model") from None


def inspect_export(path, need_ep=False):
    """Check that ``path`` is a complete model folder; ``need_ep``: it must be the EP variant.

    Complete = config.json with auto_map, every remote-code file auto_map names, weights (one file or
    shards + index), tokenizer; the EP variant also modeling_vitask.py, the EP code beside it and
    tsm/{config.json, model.safetensors} in timm's layout.
    """
    path = str(path)
    if not os.path.isdir(path):
        raise VITaskError(f"model folder {path} does not exist: pass the folder written by `xtuner convert pth_to_hf`")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise VITaskError(f"{path} has no config.json: it is not a model folder "
                          "(export with `xtuner convert pth_to_hf`)")
    config = _read_json(config_path, "model config")
    missing = []
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        missing.append("config.json 'auto_map'")
    for ref in auto_map.values():
        ref = ref[-1] if isinstance(ref, (list, tuple)) else ref
        module = ref.split("--")[-1].rsplit(".", 1)[0] + ".py"
        if not os.path.isfile(os.path.join(path, module)) and module not in missing:
            missing.append(module)
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        missing.append("model.safetensors")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        missing.append("tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(path, t)) for t in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("tokenizer.json/tokenizer.model")
    has_ep = "vitask" in config
    tsm_dir = None
    if has_ep:
        tsm_dir = os.path.join(path, config["vitask"].get("tsm_subfolder", "tsm"))
        missing += [os.path.join(os.path.basename(tsm_dir), f) for f in TSM_FILES
                    if not os.path.isfile(os.path.join(tsm_dir, f))]
        # modeling_vitask.py subclasses the base model and imports the EP code beside it
        missing += [f for f in EP_CODE_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise VITaskError(f"model folder {path} is incomplete: missing {', '.join(missing)}; re-export it with "
                          "`xtuner convert pth_to_hf` (or copy the files from the base InternVL2 folder)")
    if has_ep:
        tsm_config = _read_json(os.path.join(tsm_dir, "config.json"), "TSM config")
        if "architecture" not in tsm_config:
            raise VITaskError(f"{tsm_dir}/config.json is not in timm's folder layout: {path} was exported by an "
                              "older xtuner-vitask; export it again with `xtuner convert pth_to_hf`")
    if need_ep and not has_ep:
        raise VITaskError(f"--ep needs the EP export, but {path} is a plain InternVL2 folder (no TSM): drop --ep, "
                          "or export with `xtuner convert pth_to_hf` without --save-format official")
    meta_path = os.path.join(path, "task_meta.json")
    task_meta = _read_json(meta_path, "training meta") if os.path.isfile(meta_path) else None
    export_path = os.path.join(path, "vitask_export.json")
    export = _read_json(export_path, "export record") if os.path.isfile(export_path) else {}
    return ExportInfo(path=path, config=config, has_ep=has_ep, tsm_dir=tsm_dir, task_meta=task_meta, export=export)


def read_task_meta(info, data_meta_path=None):
    """The label space to evaluate in: the export's training meta.json, checked against the data's.

    Raises when both exist and their label names (or task type) differ.
    """
    data_meta = None
    if data_meta_path is not None and os.path.isfile(data_meta_path):
        data_meta = load_meta(data_meta_path).raw
    model_meta = info.task_meta
    if model_meta is None and data_meta is None:
        raise VITaskError(f"no label names: neither {info.path}/task_meta.json nor {data_meta_path} exists; "
                          "put the data's meta.json beside the JSONL (data_tools writes it)")
    if model_meta is not None and data_meta is not None:
        for key in ("label_names", "task_type"):
            if model_meta.get(key) != data_meta.get(key):
                ours, theirs = model_meta.get(key), data_meta.get(key)
                if isinstance(ours, list) and isinstance(theirs, list):
                    diff = next((f"{a!r} vs {b!r}" for a, b in zip(ours, theirs) if a != b),
                                f"{len(ours)} vs {len(theirs)} names")
                else:
                    diff = f"{ours!r} vs {theirs!r}"
                raise VITaskError(f"the data's {key} differ from the model's training meta.json ({diff}): "
                                  f"evaluate on data converted for this model's label set ({data_meta_path})")
    return model_meta if model_meta is not None else data_meta
