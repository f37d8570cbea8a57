"""TSM checkpoints: read safely, identify, pick the newest of a glob, rebuild frozen, check against a data set.

An mmengine TSM checkpoint is loaded with ``torch.load(weights_only=True)``: tensors, plain
containers and the few data types of mmengine's training state (``_compat.training_state_globals``)
load, any other pickled object is refused -- a downloaded TSM cannot run code on load.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import os
import pickle
import re

import torch

from .._compat import training_state_globals
from ..contract import MULTI_LABEL, MULTI_TASK, load_meta, parse_meta
from ..errors import VITaskError
from .model import TSM_FORMAT, TaskSpecificModel


def tsm_checksum(path: str) -> str:
    """sha256 of a checkpoint file (identifies the TSM an exemplar cache was made with)."""
    if not os.path.isfile(path):
        raise VITaskError(f"TSM checkpoint {path} does not exist: pass the .pth that `xtuner train` saved")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights_only(path: str, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` allowing mmengine's training-state types; one clear line
    for a file that is not a checkpoint or that holds other pickled objects (refused, never run)."""
    # safe_globals() removes its globals on exit: add only those not already allowed process-wide (the
    # mmengine import hook allows them for --resume, which must keep working after a TSM was loaded)
    allowed = set(map(id, torch.serialization.get_safe_globals()))
    try:
        with torch.serialization.safe_globals([g for g in training_state_globals() if id(g) not in allowed]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        if found is None:
            raise VITaskError(f"{path} is not a torch {what} ({type(e).__name__}): pass the {what} itself") from None
        raise VITaskError(f"{path} holds a pickled {found.group(1) or found.group(2)}, which is neither a tensor "
                          f"nor training state: refused, loading it could run code; use a {what} saved by "
                          "xtuner train from a source you trust") from None
    except Exception as e:  # not a zip/pickle at all, truncated, ...
        raise VITaskError(f"{path} is not a torch {what} ({type(e).__name__}): pass the {what} itself") from None


def _read_tsm_checkpoint(checkpoint: str) -> tuple[dict, dict, dict]:
    """(whole checkpoint, state_dict, TSM identity) of an mmengine TSM checkpoint, or a clear error."""
    if not os.path.isfile(checkpoint):
        raise VITaskError(f"TSM checkpoint {checkpoint} does not exist: pass the .pth that `xtuner train` saved")
    ckpt = load_weights_only(checkpoint, "TSM checkpoint")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise VITaskError(f"{checkpoint} holds no state_dict of tensors: pass a TSM checkpoint saved by xtuner train")
    identity = state.get("_extra_state")
    if not (isinstance(identity, dict) and identity.get("format") == TSM_FORMAT) or \
            not any(k.startswith("backbone.") for k in state):
        raise VITaskError(f"{checkpoint} is not a TSM checkpoint (no TaskSpecificModel identity / 'backbone.*' "
                          f"weights; first key {next(iter(state))!r}): pass a checkpoint of a TSM config")
    return ckpt, state, identity


def read_tsm_identity(checkpoint: str) -> dict:
    """What a TSM checkpoint records about itself (model_name, model_kwargs, num_classes, img_size,
    task_type, tasks, mean, std) without building the model -- e.g. for the TSM's input preprocessing."""
    return dict(_read_tsm_checkpoint(checkpoint)[2])


def _model_cfg_from(config, ckpt: dict, checkpoint: str) -> dict:
    """The ``model`` dict of the TSM training config (a file, a Config, or the checkpoint's meta).
    Only needed for checkpoints whose identity predates ``model_kwargs``."""
    from mmengine.config import Config

    if config is None:
        text = (ckpt.get("meta") or {}).get("cfg") if isinstance(ckpt, dict) else None
        if not text:
            raise VITaskError(f"{checkpoint} carries no training config: pass --config with the TSM training config")
        try:
            cfg = Config.fromstring(text, ".py")
        except Exception as e:
            raise VITaskError(f"cannot rebuild the config stored in {checkpoint} ({type(e).__name__}): "
                              "pass --config with the TSM training config") from e
    elif isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise VITaskError(f"TSM config {config} does not exist: pass the config the TSM was trained with")
        cfg = Config.fromfile(str(config))
    else:
        cfg = config
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    if not model_cfg:
        raise VITaskError(f"config {config or checkpoint} has no 'model': pass the TSM training config")
    model_cfg = copy.deepcopy(dict(model_cfg))
    model_cfg.pop("type", None)  # every TSM checkpoint is a TaskSpecificModel's (its identity says so)
    model_cfg.pop("meta", None)  # the classes come from the checkpoint's identity
    return model_cfg


def resolve_checkpoint(pattern):
    """A checkpoint path, or the newest file matching a glob such as 'work_dirs/tsm/best_*.pth'."""
    if os.path.isfile(pattern) or not glob.has_magic(str(pattern)):
        if not os.path.isfile(pattern):
            raise VITaskError(f"TSM checkpoint {pattern} does not exist: train it first "
                              "(xtuner train configs/tsm_vit_base_<set>.py) or fix model.tsm.checkpoint")
        return pattern
    matches = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not matches:
        raise VITaskError(f"no TSM checkpoint matches {pattern}: train the TSM first or fix model.tsm.checkpoint")
    return matches[-1]


def load_tsm(checkpoint: str, config=None, device: str | None = None) -> TaskSpecificModel:
    """Rebuild a trained TSM from its mmengine checkpoint, frozen.

    The checkpoint's identity records the timm model and its arguments; ``config`` (the TSM's
    training config file or a Config; default: the one stored in the checkpoint) is read only for
    checkpoints from before that. The returned model has ``sha256`` (:func:`tsm_checksum`) and
    ``checkpoint_path``.
    """
    ckpt, state, identity = _read_tsm_checkpoint(checkpoint)
    sha = tsm_checksum(checkpoint)
    if "model_kwargs" in identity:
        model_cfg = dict(model_name=identity["model_name"], model_kwargs=identity["model_kwargs"])
    else:
        model_cfg = _model_cfg_from(config, ckpt, checkpoint)
        if model_cfg.get("model_name") != identity["model_name"]:
            raise VITaskError(f"{checkpoint} is a {identity['model_name']} TSM but the config builds "
                              f"{model_cfg.get('model_name')}: pass the config it was trained with")
    # The checkpoint brings every weight, and its recorded head, input size and normalization win
    # over a config file's (training may have changed them with --cfg-options); a joint TSM's
    # tasks come from the checkpoint, not from the data folder.
    model_cfg.update(pretrained=False, checkpoint=None, img_size=identity["img_size"],
                     mean=identity["mean"], std=identity["std"])
    if identity.get("tasks"):
        model_cfg.update(tasks=identity["tasks"], num_classes=None)
    else:
        model_cfg.update(tasks=None, num_classes=identity["num_classes"], task_type=identity["task_type"])
    try:
        model = TaskSpecificModel(**model_cfg)
    except (VITaskError, TypeError) as e:
        raise VITaskError(f"cannot rebuild the TSM of {checkpoint}: {e}") from e
    if any(p.is_meta for p in model.parameters()):
        # `xtuner convert pth_to_hf` builds the VLM under accelerate's init_empty_weights: give the TSM real
        # (uninitialised) storage, which the checkpoint then fills completely (missing keys are refused below)
        model = model.to_empty(device="cpu")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise VITaskError(f"{checkpoint} does not fit the config's TSM ({line[:200]}): pass the config it was "
                          "trained with") from e
    if result.missing_keys or result.unexpected_keys:
        raise VITaskError(f"{checkpoint} does not match the config's TSM (missing {result.missing_keys[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}): pass the config it was trained with")
    model.sha256 = sha
    model.checkpoint_path = str(checkpoint)
    if device is not None:
        model.to(device)
    return model.freeze()


def check_tsm_matches_meta(tsm: TaskSpecificModel, meta) -> None:
    """Refuse a TSM whose classes do not match the data's meta.json (a dict or a path)."""
    where = meta if isinstance(meta, (str, os.PathLike)) else "meta.json"
    meta = load_meta(meta).raw if isinstance(meta, (str, os.PathLike)) else parse_meta(meta).raw
    if meta.get("task_type") == MULTI_TASK:
        # offsets are the model's own business (labels stay local): names, sizes and kinds must agree
        data_tasks = {k: (int(v["num_classes"]), v["task_type"]) for k, v in meta["tasks"].items()}
        if not tsm.joint:
            raise VITaskError(f"{where} is a merged set of {len(data_tasks)} tasks but the TSM has one "
                              f"{tsm.num_classes}-class head: use a joint TSM trained on that merged set")
        tsm_tasks = {k: (v["num_classes"], v["task_type"]) for k, v in tsm.tasks.items()}
        if tsm_tasks != data_tasks:
            differ = sorted(set(tsm_tasks.items()) ^ set(data_tasks.items()))[:3]
            raise VITaskError(f"the joint TSM's tasks differ from {where}'s (e.g. {differ}): use the TSM "
                              "trained on this merged set")
        return
    n_data = len(meta["label_names"])
    if tsm.joint:  # the paper's joint TSM serves each of its data sets
        name = meta.get("dataset")
        own = tsm.layout.get(name)
        if own is None or own.num_classes != n_data:
            raise VITaskError(f"the joint TSM has no {n_data}-class task {name!r} (its tasks: {sorted(tsm.layout)}): "
                              "use a TSM trained on this data set")
        return
    if tsm.num_classes != n_data:
        raise VITaskError(f"TSM has {tsm.num_classes} classes but {where} ({meta.get('dataset', '?')}) has "
                          f"{n_data}: use the TSM trained on this data set")
    if (meta.get("task_type") == MULTI_LABEL) != (tsm.task_type == MULTI_LABEL):
        raise VITaskError(f"TSM task type {tsm.task_type} does not fit {where}'s {meta.get('task_type')}: "
                          "use the TSM trained on this data set")
