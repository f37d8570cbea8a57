"""The task-specific model (TSM): any timm classifier as an mmengine model, and its exemplar features.

Trained with ``xtuner train configs/tsm_*.py`` (mmengine's Runner), a :class:`TaskSpecificModel`
is a timm backbone with a linear head over the data set's classes: cross-entropy for
multi-class / binary / ordinal sets, BCE-with-logits for multi-label sets (ChestMNIST). In joint
mode (``tasks`` = a merged meta.json's ``tasks``) the head spans the joint label space and each
sample's loss only sees its own task's slice of it (the paper's 70-class TSM over 12 sets).

Frozen, it gives VITask its exemplars: :meth:`TaskSpecificModel.extract_features` returns the
CLS token (EP_cls) or the patch tokens (EP_all). :func:`load_tsm` rebuilds a trained TSM from its
config and mmengine checkpoint, frozen; :func:`tsm_checksum` identifies the checkpoint file.

Pixels come normalized by :func:`xtuner_vitask.datasets.classification.build_tsm_transform`
with the model's ``img_size``, ``mean`` and ``std`` (the data preprocessor only batches and moves
them), so training, the exemplar cache and VITask feed the TSM identical pixels.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import glob
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import MODELS

from xtuner_vitask.contract import MULTI_CLASS, MULTI_LABEL, MULTI_TASK, SINGLE_LABEL_TYPES, load_meta, parse_meta
from xtuner_vitask.errors import VITaskError

TSM_FORMAT = "xtuner_vitask.tsm/1"
FEATURE_KINDS = ("cls", "all")


@dataclass(frozen=True)
class TaskSlice:
    """Where one task's classes sit in the model's output and how they are trained."""
    name: str | None
    offset: int
    num_classes: int
    task_type: str

    @property
    def multi_label(self) -> bool:
        return self.task_type == MULTI_LABEL

    @property
    def stop(self) -> int:
        return self.offset + self.num_classes


def _check_task_type(task_type: str, where: str) -> str:
    if task_type not in SINGLE_LABEL_TYPES + (MULTI_LABEL,):
        raise VITaskError(f"{where}: task_type {task_type!r} is not one of "
                          f"{', '.join(SINGLE_LABEL_TYPES + (MULTI_LABEL,))}")
    return task_type


def build_task_layout(num_classes: int | None, task_type: str, tasks: dict | None) -> dict:
    """``{task name (None in single mode): TaskSlice}``.

    Joint mode: tasks with identical label sets may share a slice (data_tools' merge does so for
    OrganA/C/S-MNIST, giving the paper's 70 classes); the distinct slices must tile 0..C.
    """
    if not tasks:
        if not num_classes or num_classes < 1:
            raise VITaskError(f"num_classes must be a positive integer, got {num_classes!r}")
        return {None: TaskSlice(None, 0, int(num_classes), _check_task_type(task_type, "TaskSpecificModel"))}
    layout, distinct = {}, {}
    for name, spec in tasks.items():
        sl = TaskSlice(name, int(spec["offset"]), int(spec["num_classes"]),
                       _check_task_type(spec["task_type"], f"task {name}"))
        shared = distinct.setdefault(sl.offset, sl)
        if (shared.num_classes, shared.task_type) != (sl.num_classes, sl.task_type):
            raise VITaskError(f"tasks {shared.name} and {name} share offset {sl.offset} with different classes: "
                              "use the merged meta.json's 'tasks'")
        layout[name] = sl
    covered = 0
    for offset, sl in sorted(distinct.items()):
        if offset != covered:
            raise VITaskError(f"task {sl.name} starts at class {offset}, expected {covered}: the tasks' "
                              "slices must tile the joint label space (use the merged meta.json's 'tasks')")
        covered = sl.stop
    if num_classes is not None and num_classes != covered:
        raise VITaskError(f"num_classes={num_classes} but the tasks cover {covered} classes: drop num_classes "
                          "or make it the joint class count")
    return layout


def task_restricted_loss(logits: torch.Tensor, gt_labels: Sequence[torch.Tensor],
                         task_names: Sequence[str | None], layout: dict) -> torch.Tensor:
    """Mean per-sample loss, each sample scored only on its own task's slice of the logits.

    Single-label tasks: cross-entropy over the slice (``gt`` = local class index). Multi-label
    tasks: BCE-with-logits averaged over the slice's labels (``gt`` = local multi-hot). Logits
    outside a sample's slice get no gradient from that sample.
    """
    groups: dict = {}
    for i, name in enumerate(task_names):
        groups.setdefault(slice_for(layout, name), []).append(i)
    total = logits.new_zeros(())
    for sl, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        part = logits.index_select(0, index)[:, sl.offset:sl.stop]
        target = torch.stack([gt_labels[i] for i in rows]).to(logits.device)
        if sl.multi_label:
            total = total + F.binary_cross_entropy_with_logits(
                part, target.float(), reduction="none").mean(dim=1).sum()
        else:
            total = total + F.cross_entropy(part, target.long().view(-1), reduction="sum")
    return total / max(len(task_names), 1)


def slice_for(layout: dict, task: str | None) -> TaskSlice:
    """The sample's task slice; a single-task model takes every sample whatever its task name."""
    if len(layout) == 1:
        return next(iter(layout.values()))
    if task not in layout:
        raise VITaskError(f"sample task {task!r} is not one of the TSM's tasks {sorted(layout)}: "
                          "train the joint TSM on the same merged set")
    return layout[task]


def read_tasks(meta_path) -> dict:
    """The 'tasks' of a merged set's meta.json (a file or the folder holding it)."""
    meta = load_meta(meta_path)
    if not meta.multi_task:
        raise VITaskError(f"{meta.where} is not a merged {MULTI_TASK} meta.json (task_type={meta.task_type!r}): "
                          "the joint TSM needs the merged set's meta.json")
    return meta.raw["tasks"]


def timm_normalization(model_name: str) -> tuple[tuple, tuple]:
    """(mean, std) of the timm model's pretrained_cfg (read from timm's tables; no download)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:
        cfg = None
    mean = tuple(getattr(cfg, "mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(cfg, "std", None) or (0.5, 0.5, 0.5))
    return mean, std


def check_timm_name(model_name: str) -> None:
    """A clear error for a timm name (or pretrained tag) that timm does not know."""
    import timm
    from timm.models import get_pretrained_cfg

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = timm.list_models(f"*{str(model_name).split('.')[0][:8]}*")[:5]
        raise VITaskError(f"timm has no model named {model_name!r}: pick one from timm.list_models()"
                          + (f" (e.g. {', '.join(close)})" if close else ""))
    if "." in model_name:
        try:
            get_pretrained_cfg(model_name)
        except RuntimeError:
            arch = model_name.split(".")[0]
            raise VITaskError(f"timm model {arch} has no pretrained tag {model_name.split('.', 1)[1]!r}: "
                              f"pick one of timm.list_pretrained('{arch}*')") from None


@MODELS.register_module()
class TaskSpecificModel(BaseModel):
    """A timm classifier trained by mmengine; frozen, the source of VITask's exemplars.

    Args:
        model_name: any timm name, e.g. ``'vit_base_patch16_224.augreg_in21k'`` (the paper's
            ViT-B/16 ImageNet-21k weights).
        num_classes: classes of the head (joint count in joint mode; may be omitted there).
        img_size: square input size in pixels.
        pretrained: load timm's pretrained weights for ``model_name`` (needs the hub or its cache).
        checkpoint: a local timm weights file to start from instead (the head is re-initialized
            when its class count differs).
        task_type: 'multi-class' | 'binary' | 'ordinal' (cross-entropy) or 'multi-label' (BCE).
        tasks: joint mode: a merged meta.json's ``tasks`` ({name: {offset, num_classes, task_type}}).
        mean, std: pixel normalization the data pipeline uses (default: timm's pretrained_cfg).
        model_kwargs: extra ``timm.create_model`` keyword arguments (patch_size, depth, drop_path_rate...).
        data_preprocessor: mmengine data preprocessor config (default: batch + device move only).
    """

    def __init__(self, model_name: str, num_classes: int | None = None, img_size: int = 224,
                 pretrained: bool = False, checkpoint: str | None = None, task_type: str = MULTI_CLASS,
                 tasks: dict | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, model_kwargs: dict | None = None,
                 data_preprocessor: dict | None = None, init_cfg: dict | None = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        check_timm_name(model_name)
        tasks = read_tasks(tasks) if isinstance(tasks, (str, os.PathLike)) else tasks
        self.layout = build_task_layout(num_classes, task_type, dict(tasks) if tasks else None)
        self.joint = bool(tasks)
        self.model_name = model_name
        self.num_classes = max(sl.stop for sl in self.layout.values())
        self.task_type = MULTI_TASK if self.joint else task_type
        self.img_size = int(img_size)
        default_mean, default_std = timm_normalization(model_name)
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self.backbone = self._create_backbone(pretrained, checkpoint, dict(model_kwargs or {}))
        self._frozen = False
        self._probe_input_size()

    # ----------------------------------------------------------------- construction
    def _create_backbone(self, pretrained: bool, checkpoint: str | None, kwargs: dict):
        import timm

        if self.img_size <= 0:
            raise VITaskError(f"img_size must be positive, got {self.img_size}")
        if checkpoint is not None:
            if not os.path.isfile(checkpoint):
                raise VITaskError(f"TSM backbone checkpoint {checkpoint} does not exist: pass a local timm weights file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
        else:
            kwargs.update(pretrained=bool(pretrained))
        try:
            try:
                return timm.create_model(self.model_name, num_classes=self.num_classes,
                                         img_size=self.img_size, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
                # CNNs take any size and have no img_size argument
                return timm.create_model(self.model_name, num_classes=self.num_classes, **kwargs)
        except VITaskError:
            raise
        except (RuntimeError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if checkpoint is not None:
                raise VITaskError(f"cannot load {checkpoint} into timm model {self.model_name} ({first}): "
                                  "pass that model's timm weights file") from e
            if kwargs.get("pretrained"):
                raise VITaskError(f"cannot fetch pretrained weights for {self.model_name} ({first}): download them "
                                  "and pass checkpoint=FILE, or set pretrained=False") from e
            raise VITaskError(f"timm cannot build {self.model_name} with img_size={self.img_size} "
                              f"and {sorted(kwargs)} ({first})") from e

    def _probe_input_size(self):
        """Refuse an image size the backbone cannot take, and learn the feature shapes."""
        patch_embed = getattr(self.backbone, "patch_embed", None)
        patch = getattr(patch_embed, "patch_size", None)
        if patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
            if self.img_size % ph or self.img_size % pw:
                raise VITaskError(f"img_size={self.img_size} is not a multiple of {self.model_name}'s patch size "
                                  f"{ph}: use a multiple of {ph} (e.g. {max(ph, round(self.img_size / ph) * ph)})")
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                feats = self.backbone.forward_features(torch.zeros(1, 3, self.img_size, self.img_size,
                                                                      device=next(self.backbone.parameters()).device))
                pooled = self.backbone.forward_head(feats, pre_logits=True)
                tokens = self._patch_tokens(feats)
        except Exception as e:  # timm/torch raise various types for impossible sizes
            raise VITaskError(f"{self.model_name} cannot take {self.img_size}x{self.img_size} images "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): "
                              "use a larger img_size") from e
        finally:
            self.backbone.train(was_training)
        self._cls_dim = int(pooled.shape[-1])
        self._token_shape = (int(tokens.shape[1]), int(tokens.shape[2]))

    # ----------------------------------------------------------------- properties
    @property
    def feature_dim(self) -> int:
        """Dimension of one exemplar feature (the CLS / pooled pre-logits vector)."""
        return self._cls_dim

    def feature_shape(self, kind: str = "cls") -> tuple:
        """Shape of one image's exemplar: (D,) for 'cls', (N_tokens, D) for 'all'."""
        _check_kind(kind)
        return (self._cls_dim,) if kind == "cls" else self._token_shape

    @property
    def tasks(self) -> dict:
        """``{name: {'offset', 'num_classes', 'task_type'}}`` (single mode: one entry named None)."""
        return {sl.name: {"offset": sl.offset, "num_classes": sl.num_classes, "task_type": sl.task_type}
                for sl in self.layout.values()}

    # ----------------------------------------------------------------- mmengine forward
    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "tensor"):
        """mmengine's three modes: 'loss' -> {'loss'}, 'predict' -> list of dicts, 'tensor' -> logits."""
        logits = self.backbone(inputs)
        if mode == "tensor":
            return logits
        if mode == "loss":
            if not data_samples:
                raise VITaskError("TaskSpecificModel mode='loss' needs data_samples with 'gt_label'")
            return {"loss": task_restricted_loss(logits, [d["gt_label"] for d in data_samples],
                                                 [d.get("task") for d in data_samples], self.layout)}
        if mode == "predict":
            return self.predict_from_logits(logits, data_samples)
        raise VITaskError(f"mode={mode!r}: use 'loss', 'predict' or 'tensor'")

    def predict_from_logits(self, logits: torch.Tensor, data_samples: list | None = None) -> list[dict]:
        """Per sample: scores over its own task slice (softmax / sigmoid), pred_label, gt_label, task."""
        if data_samples is None:
            if self.joint:
                raise VITaskError("a joint TSM needs each sample's 'task' to predict: pass data_samples")
            data_samples = [{} for _ in range(len(logits))]
        results = []
        for row, sample in zip(logits.detach().float().cpu(), data_samples):
            sl = slice_for(self.layout, sample.get("task"))
            part = row[sl.offset:sl.stop]
            if sl.multi_label:
                scores = torch.sigmoid(part)
                pred = (scores > 0.5).float()
            else:
                scores = torch.softmax(part, dim=-1)
                pred = scores.argmax()
            out = {"scores": scores, "pred_label": pred, "task": sample.get("task", sl.name),
                   "task_type": sl.task_type, "id": sample.get("id")}
            if "gt_label" in sample:
                out["gt_label"] = torch.as_tensor(sample["gt_label"]).cpu()
            results.append(out)
        return results

    # ----------------------------------------------------------------- frozen use
    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, kind: str = "cls") -> torch.Tensor:
        """Exemplars of a batch of normalized images, in eval mode and without gradients.

        'cls': (B, D), the pooled pre-logits feature -- the CLS token for ViTs (EP_cls).
        'all': (B, N, D), the patch tokens (ViT prefix tokens dropped; CNN feature maps flattened) (EP_all).
        """
        _check_kind(kind)
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.img_size,) * 2:
            raise VITaskError(f"TSM images must be (B, 3, {self.img_size}, {self.img_size}), got "
                              f"{tuple(images.shape)}: build them with build_tsm_transform(tsm.img_size, ...)")
        param = next(self.backbone.parameters())
        with _eval_mode(self.backbone):
            feats = self.backbone.forward_features(images.to(device=param.device, dtype=param.dtype))
            if kind == "cls":
                return self.backbone.forward_head(feats, pre_logits=True)
            return self._patch_tokens(feats)

    def _patch_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() == 4:  # CNN: (B, C, H, W) -> (B, H*W, C)
            return feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(self.backbone, "num_prefix_tokens", 0):]

    def freeze(self) -> "TaskSpecificModel":
        """No gradients, eval mode, and stay in eval mode when a parent calls ``.train()``."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False if getattr(self, "_frozen", False) else mode)

    # ----------------------------------------------------------------- identity in the checkpoint
    def identity(self) -> dict:
        """What a checkpoint records about this TSM (saved as the state dict's ``_extra_state``)."""
        return {"format": TSM_FORMAT, "model_name": self.model_name, "num_classes": self.num_classes,
                "img_size": self.img_size, "task_type": self.task_type,
                "tasks": self.tasks if self.joint else None, "mean": list(self.mean), "std": list(self.std)}

    def get_extra_state(self) -> dict:
        return self.identity()

    def set_extra_state(self, state: dict) -> None:
        mine = self.identity()
        differ = [k for k in ("model_name", "num_classes", "img_size", "task_type")
                  if state.get(k) != mine[k]]
        if differ:
            raise VITaskError("the checkpoint's TSM (" + ", ".join(f"{k}={state.get(k)!r}" for k in differ)
                              + ") differs from the config's (" + ", ".join(f"{k}={mine[k]!r}" for k in differ)
                              + "): pass the config it was trained with")


def _check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise VITaskError(f"feature kind {kind!r}: use 'cls' (EP_cls) or 'all' (EP_all)")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# --------------------------------------------------------------------- checkpoints
def tsm_checksum(path: str) -> str:
    """sha256 of a checkpoint file (identifies the TSM an exemplar cache was made with)."""
    if not os.path.isfile(path):
        raise VITaskError(f"TSM checkpoint {path} does not exist: pass the .pth that `xtuner train` saved")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_tsm_checkpoint(checkpoint: str) -> tuple[dict, dict, dict]:
    """(whole checkpoint, state_dict, TSM identity) of an mmengine TSM checkpoint, or a clear error."""
    if not os.path.isfile(checkpoint):
        raise VITaskError(f"TSM checkpoint {checkpoint} does not exist: pass the .pth that `xtuner train` saved")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)  # the user's own training state
    except Exception as e:
        raise VITaskError(f"{checkpoint} is not a torch checkpoint ({type(e).__name__}): pass the TSM's .pth") from e
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
    """What a TSM checkpoint records about itself (model_name, num_classes, img_size, task_type,
    tasks, mean, std) without building the model -- e.g. for the TSM's input preprocessing."""
    return dict(_read_tsm_checkpoint(checkpoint)[2])


def _model_cfg_from(config, ckpt: dict, checkpoint: str) -> dict:
    """The ``model`` dict of the TSM training config (a file, a Config, or the checkpoint's meta)."""
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
    return copy.deepcopy(dict(model_cfg))


def _resolve_type(type_):
    if isinstance(type_, str):
        return MODELS.get(type_)
    if hasattr(type_, "build") and not isinstance(type_, type):  # mmengine LazyObject
        return type_.build()
    return type_


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


def load_tsm(checkpoint: str, config=None, map_location: str = "cpu", device: str | None = None) -> TaskSpecificModel:
    """Rebuild a trained TSM from its training config and mmengine checkpoint, frozen.

    ``config`` is the TSM's training config file (or a Config); without it the config stored in
    the checkpoint's ``meta`` is used. The returned model has ``sha256`` (:func:`tsm_checksum`).
    """
    ckpt, state, identity = _read_tsm_checkpoint(checkpoint)
    sha = tsm_checksum(checkpoint)
    model_cfg = _model_cfg_from(config, ckpt, checkpoint)
    model_type = _resolve_type(model_cfg.pop("type", None))
    if not (isinstance(model_type, type) and issubclass(model_type, TaskSpecificModel)):
        raise VITaskError(f"config model type is {getattr(model_type, '__name__', model_type)}, not "
                          "TaskSpecificModel: pass the TSM training config")
    if model_cfg.get("model_name") != identity["model_name"]:
        raise VITaskError(f"{checkpoint} is a {identity['model_name']} TSM but the config builds "
                          f"{model_cfg.get('model_name')}: pass the config it was trained with")
    # The checkpoint brings every weight, and its recorded head, input size and normalization win
    # over the config file's (training may have changed them with --cfg-options); a joint TSM's
    # tasks come from the checkpoint, not from the data folder.
    model_cfg.update(pretrained=False, checkpoint=None, img_size=identity["img_size"],
                     mean=identity["mean"], std=identity["std"])
    if identity.get("tasks"):
        model_cfg.update(tasks=identity["tasks"], num_classes=None)
    else:
        model_cfg.update(tasks=None, num_classes=identity["num_classes"], task_type=identity["task_type"])
    try:
        model = model_type(**model_cfg)
    except VITaskError as e:
        raise VITaskError(f"cannot rebuild the TSM of {checkpoint} from its config: {e}") from e
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
