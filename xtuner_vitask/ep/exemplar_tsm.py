"""The TSM side of exemplar prompting: a timm classifier's exemplar features and its input pixels.

One implementation for the TSM's training, the exemplar cache, VITask training, evaluation and
the EP export (a verbatim copy sits beside ``modeling_vitask.py``):

- :func:`tsm_features`: the CLS / pooled pre-logits feature (EP_cls) or the patch tokens (EP_all).
- :func:`tsm_transform`: the TSM's one preprocessing of a PIL image (timm's own eval transform:
  bicubic resize of the whole image to a square, the TSM's mean/std).
- :func:`internvl_tiles_to_tsm`: the same pixels derived from InternVL's normalized tiles, for
  callers that only have those (``model.chat(...)`` without ``tsm_pixel_values``).
- :class:`ExemplarTSM`: a frozen timm model saved and loaded in timm's own Hugging Face folder
  layout (``config.json`` + ``model.safetensors``, ``timm.create_model("local-dir:DIR")``), its
  preprocessing in the folder's ``pretrained_cfg``.

torch, timm and PIL only.
"""
import contextlib
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from .exemplar_errors import VITaskError

FEATURE_KINDS = ("cls", "all")
# InternVL2's image normalization (ImageNet's), which its tiles carry.
INTERNVL_MEAN = (0.485, 0.456, 0.406)
INTERNVL_STD = (0.229, 0.224, 0.225)
FOLDER_KEY = "vitask_tsm"  # what xtuner-vitask adds to timm's config.json


def check_kind(kind):
    if kind not in FEATURE_KINDS:
        raise VITaskError(f"feature kind {kind!r}: use 'cls' (EP_cls) or 'all' (EP_all)")


@contextlib.contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def patch_tokens(backbone, feats):
    """forward_features output -> (B, N, D) tokens: ViT prefix tokens dropped, CNN maps flattened."""
    if feats.dim() == 4:  # CNN: (B, C, H, W) -> (B, H*W, C)
        return feats.flatten(2).transpose(1, 2)
    return feats[:, getattr(backbone, "num_prefix_tokens", 0):]


@torch.no_grad()
def tsm_features(backbone, images, kind="cls", img_size=None):
    """Exemplars of a batch of TSM pixels, in eval mode and without gradients.

    'cls': (B, D), the pooled pre-logits feature -- the CLS token for ViTs (EP_cls).
    'all': (B, N, D), the patch tokens (EP_all / EP_rep).
    """
    check_kind(kind)
    if img_size is not None and (images.dim() != 4 or images.shape[1] != 3
                                 or tuple(images.shape[-2:]) != (img_size, img_size)):
        raise VITaskError(f"TSM images must be (B, 3, {img_size}, {img_size}), got {tuple(images.shape)}: "
                          "build them with the TSM's own preprocessing (tsm_transform)")
    param = next(backbone.parameters())
    with _eval_mode(backbone):
        feats = backbone.forward_features(images.to(device=param.device, dtype=param.dtype))
        if kind == "cls":
            return backbone.forward_head(feats, pre_logits=True)
        return patch_tokens(backbone, feats)


def data_config(img_size, mean, std):
    """The TSM's preprocessing as timm's data config (what the folder's pretrained_cfg records)."""
    return dict(input_size=(3, int(img_size), int(img_size)), interpolation="bicubic", mean=tuple(mean),
                std=tuple(std), crop_pct=1.0, crop_mode="squash")


def tsm_transform(img_size, mean, std):
    """PIL RGB image -> normalized (3, S, S) float tensor: timm's eval transform, squashing the whole image."""
    from timm.data import create_transform

    if int(img_size) <= 0:
        raise VITaskError(f"img_size must be a positive number of pixels, got {img_size}")
    return create_transform(is_training=False, **data_config(img_size, mean, std))


def internvl_tiles_to_tsm(tiles, img_size, mean, std, internvl_mean=INTERNVL_MEAN, internvl_std=INTERNVL_STD):
    """InternVL-normalized tiles (B, 3, H, W) -> TSM pixels (B, 3, S, S): undo, resize (bicubic), renormalize.

    Close to :func:`tsm_transform` of the image the tiles came from, not bit-identical (the tile was
    resized once already, and torch's bicubic is not PIL's): pass the TSM's own pixels where you can.
    """
    shape = (1, 3, 1, 1)
    rgb = tiles.float() * torch.tensor(internvl_std, device=tiles.device).view(shape) \
        + torch.tensor(internvl_mean, device=tiles.device).view(shape)
    rgb = F.interpolate(rgb.clamp(0, 1), size=(int(img_size), int(img_size)), mode="bicubic", align_corners=False,
                        antialias=True).clamp(0, 1)
    return (rgb - torch.tensor(mean, device=tiles.device).view(shape)) / torch.tensor(std, device=tiles.device).view(shape)


class ExemplarTSM(nn.Module):
    """A frozen timm classifier as the source of exemplars, with its own preprocessing.

    Saved with :meth:`save` in timm's Hugging Face layout (``timm.models.save_for_hf``: config.json
    with the architecture, its arguments and the preprocessing, + model.safetensors) and loaded with
    :meth:`from_folder` (``timm.create_model("local-dir:DIR")``); xtuner-vitask's own record (TSM
    identity, checksum of the training checkpoint) is the config's ``vitask_tsm`` entry.
    """

    def __init__(self, backbone, img_size, mean, std, info=None):
        super().__init__()
        self.backbone = backbone
        self.img_size = int(img_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.info = dict(info or {})
        self.requires_grad_(False)
        self.eval()
        param = next(self.backbone.parameters())
        probe = torch.zeros(1, 3, self.img_size, self.img_size, device=param.device, dtype=param.dtype)
        self.feature_dim = int(tsm_features(self.backbone, probe, "cls").shape[-1])

    @classmethod
    def from_folder(cls, folder):
        """Load a folder written by :meth:`save` (timm's layout) -> frozen ExemplarTSM."""
        import timm
        from timm.data import resolve_model_data_config

        config_path = os.path.join(folder, "config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as err:
            raise VITaskError(f"cannot read the TSM config {config_path} ({type(err).__name__}): re-export the "
                              "model (xtuner convert pth_to_hf)") from None
        if "architecture" not in config:
            raise VITaskError(f"{config_path} is not in timm's folder layout (no 'architecture'): it was written by "
                              "an older xtuner-vitask; re-export the model or re-plug its TSM")
        backbone = timm.create_model(f"local-dir:{os.path.abspath(folder)}", pretrained=True)
        data = resolve_model_data_config(backbone)
        return cls(backbone, data["input_size"][-1], data["mean"], data["std"], info=config.get(FOLDER_KEY))

    def save(self, folder, model_args=None):
        """Write ``folder`` in timm's layout: config.json (architecture, ``model_args``, preprocessing,
        ``vitask_tsm``) + model.safetensors."""
        from timm.models import save_for_hf

        save_for_hf(self.backbone, folder, model_config={FOLDER_KEY: self.info}, model_args=model_args,
                    safe_serialization=True, data_config=data_config(self.img_size, self.mean, self.std))

    def train(self, mode=True):
        return super().train(False)  # always frozen

    def extract_features(self, images, kind="cls"):
        return tsm_features(self.backbone, images, kind, img_size=self.img_size)

    def preprocess(self, image):
        """PIL image -> (3, S, S) TSM pixels (a 16-bit image should be read with xtuner-vitask's reader first)."""
        return tsm_transform(self.img_size, self.mean, self.std)(image if image.mode == "RGB" else image.convert("RGB"))

    def from_internvl_tiles(self, tiles):
        """InternVL-normalized tiles (B, 3, H, W) -> (B, 3, S, S) TSM pixels (see :func:`internvl_tiles_to_tsm`)."""
        return internvl_tiles_to_tsm(tiles, self.img_size, self.mean, self.std)
