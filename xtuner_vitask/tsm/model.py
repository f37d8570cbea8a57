"""The task-specific model (TSM): any timm classifier as an mmengine model.

Trained with ``xtuner train configs/tsm_*.py`` (mmengine's Runner), a :class:`TaskSpecificModel`
is a timm backbone with a linear head over the data set's classes: cross-entropy for
multi-class / binary / ordinal sets, BCE-with-logits for multi-label sets (ChestMNIST). In joint
mode (``tasks`` = a merged meta.json's ``tasks``) the head spans the joint label space and each
sample's loss only sees its own task's slice of it (the paper's 70-class TSM over 12 sets).

Frozen, it gives VITask its exemplars (:meth:`TaskSpecificModel.extract_features`, i.e.
``xtuner_vitask.ep.exemplar_tsm.tsm_features``, the code the EP export runs too). Pixels come from
``xtuner_vitask.ep.exemplar_tsm.tsm_transform`` with the model's ``img_size``, ``mean`` and ``std``
(the data preprocessor only batches and moves them), so training, the exemplar cache, VITask and
the export feed the TSM identical pixels. Checkpoints: :mod:`.checkpoint`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import MODELS

from ..contract import MULTI_CLASS, MULTI_LABEL, LabelSlice, MULTI_TASK, SINGLE_LABEL_TYPES, load_meta, parse_meta
from ..ep.exemplar_tsm import check_kind, tsm_features
from ..errors import VITaskError

TSM_FORMAT = "xtuner_vitask.tsm/1"



@dataclass(frozen=True)
class TaskSlice(LabelSlice):
    """Where one task's classes sit in the model's output and how they are trained."""
    name: str | None
    offset: int
    num_classes: int
    task_type: str


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
        _check_targets(target, sl)
        if sl.multi_label:
            total = total + F.binary_cross_entropy_with_logits(
                part, target.float(), reduction="none").mean(dim=1).sum()
        else:
            total = total + F.cross_entropy(part, target.long().view(-1), reduction="sum")
    return total / max(len(task_names), 1)


def _check_targets(target: torch.Tensor, sl: TaskSlice) -> None:
    """Labels the head cannot score: the model was built for another data set (one sync per step)."""
    where = f"task {sl.name!r}" if sl.name else "the data"
    fix = "point model.meta at the training data's meta.json (and drop num_classes/task_type)"
    if sl.multi_label:
        if target.shape[-1] != sl.num_classes:
            raise VITaskError(f"{where} has {target.shape[-1]} labels per sample but the TSM head has "
                              f"{sl.num_classes}: {fix}")
    elif bool(((target < 0) | (target >= sl.num_classes)).any()):
        raise VITaskError(f"{where} has label {int(target.max())} but the TSM head has {sl.num_classes} classes: {fix}")


def slice_for(layout: dict, task: str | None) -> TaskSlice:
    """The sample's task slice; a single-task model takes every sample whatever its task name."""
    if len(layout) == 1:
        return next(iter(layout.values()))
    if task not in layout:
        raise VITaskError(f"sample task {task!r} is not one of the TSM's tasks {sorted(layout)}: "
                          "train the joint TSM on the same merged set")
    return layout[task]


def classes_from_meta(meta, num_classes=None, task_type=None, tasks=None) -> tuple:
    """(num_classes, task_type, tasks) of a data set's meta.json (a path or dict), checked against explicit values.

    A merged multi-task meta.json gives the joint layout (``tasks``); any other gives the head's
    class count (its label names) and task type.
    """
    where = str(meta) if isinstance(meta, (str, os.PathLike)) else "meta"
    meta = load_meta(meta).raw if isinstance(meta, (str, os.PathLike)) else parse_meta(meta).raw
    if meta["task_type"] == MULTI_TASK:
        if num_classes is not None and num_classes != len(meta["label_names"]):
            raise VITaskError(f"num_classes={num_classes} but {where} is a merged set of {len(meta['label_names'])} "
                              "classes: drop num_classes (the meta.json gives it)")
        return None, task_type or MULTI_CLASS, dict(meta["tasks"])
    n = len(meta["label_names"])
    for name, given, found in (("num_classes", num_classes, n), ("task_type", task_type, meta["task_type"])):
        if given is not None and given != found:
            raise VITaskError(f"{name}={given!r} but {where} says {found!r}: drop {name} from the config "
                              "(the data's meta.json gives it) or point model.meta at the training data")
    return n, meta["task_type"], tasks


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


def _plain(value):
    """Config values as plain dicts/lists (a checkpoint loaded with weights_only=True holds no ConfigDict)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if type(value) in (list, tuple) else [_plain(v) for v in value]
    return value


@MODELS.register_module()
class TaskSpecificModel(BaseModel):
    """A timm classifier trained by mmengine; frozen, the source of VITask's exemplars.

    Args:
        model_name: any timm name, e.g. ``'vit_base_patch16_224.augreg_in21k'`` (the paper's
            ViT-B/16 ImageNet-21k weights).
        meta: the training data's meta.json (path or dict): gives ``num_classes`` and ``task_type``,
            or ``tasks`` for a merged multi-task set, so configs need not repeat them.
        num_classes: classes of the head (without ``meta``; joint count in joint mode, may be omitted there).
        img_size: square input size in pixels.
        pretrained: load timm's pretrained weights for ``model_name`` (needs the hub or its cache).
        checkpoint: a local timm weights file to start from instead (the head is re-initialized
            when its class count differs).
        task_type: 'multi-class' (default) | 'binary' | 'ordinal' (cross-entropy) or 'multi-label' (BCE).
        tasks: joint mode: a merged meta.json's ``tasks`` ({name: {offset, num_classes, task_type}});
            ``meta`` of a merged set gives them.
        mean, std: pixel normalization the data pipeline uses (default: timm's pretrained_cfg).
        model_kwargs: extra ``timm.create_model`` keyword arguments (patch_size, depth, drop_path_rate...).
        data_preprocessor: mmengine data preprocessor config (default: batch + device move only).
    """

    def __init__(self, model_name: str, num_classes: int | None = None, img_size: int = 224,
                 pretrained: bool = False, checkpoint: str | None = None, task_type: str | None = None,
                 tasks: dict | None = None, meta=None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, model_kwargs: dict | None = None,
                 data_preprocessor: dict | None = None, init_cfg: dict | None = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        check_timm_name(model_name)
        if meta is not None:
            num_classes, task_type, tasks = classes_from_meta(meta, num_classes, task_type, tasks)
        task_type = task_type or MULTI_CLASS
        self.layout = build_task_layout(num_classes, task_type, dict(tasks) if tasks else None)
        self.joint = bool(tasks)
        self.model_name = model_name
        self.num_classes = max(sl.stop for sl in self.layout.values())
        self.task_type = MULTI_TASK if self.joint else task_type
        self.img_size = int(img_size)
        default_mean, default_std = timm_normalization(model_name)
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self.model_kwargs = _plain(dict(model_kwargs or {}))  # recorded in checkpoints: no ConfigDict
        self.backbone = self._create_backbone(pretrained, checkpoint, dict(self.model_kwargs))
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
        try:
            probe = torch.zeros(1, 3, self.img_size, self.img_size, device=next(self.backbone.parameters()).device)
            pooled = tsm_features(self.backbone, probe, "cls")
            tokens = tsm_features(self.backbone, probe, "all")
        except Exception as e:  # timm/torch raise various types for impossible sizes
            raise VITaskError(f"{self.model_name} cannot take {self.img_size}x{self.img_size} images "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): "
                              "use a larger img_size") from e
        self._cls_dim = int(pooled.shape[-1])
        self._token_shape = (int(tokens.shape[1]), int(tokens.shape[2]))

    # ----------------------------------------------------------------- properties
    @property
    def feature_dim(self) -> int:
        """Dimension of one exemplar feature (the CLS / pooled pre-logits vector)."""
        return self._cls_dim

    def feature_shape(self, kind: str = "cls") -> tuple:
        """Shape of one image's exemplar: (D,) for 'cls', (N_tokens, D) for 'all'."""
        check_kind(kind)
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
    def extract_features(self, images: torch.Tensor, kind: str = "cls") -> torch.Tensor:
        """Exemplars of a batch of TSM pixels (eval mode, no gradients): 'cls' (B, D) or 'all' (B, N, D);
        :func:`xtuner_vitask.ep.exemplar_tsm.tsm_features`, the code the EP export runs."""
        return tsm_features(self.backbone, images, kind, img_size=self.img_size)

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
        return {"format": TSM_FORMAT, "model_name": self.model_name, "model_kwargs": self.model_kwargs,
                "num_classes": self.num_classes,
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


