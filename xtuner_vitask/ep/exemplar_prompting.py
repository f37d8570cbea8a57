"""Exemplar prompting (paper sec. 4, eq. 2): the connector, where its tokens go, and the splice.

Training (``xtuner_vitask.models.vitask``) and the EP export (``modeling_vitask.py``, beside a
verbatim copy of this file) both put the exemplar tokens into the LLM's input embeddings here, so
a trained model and its export see the same sequence. torch only.
"""
import torch
from torch import nn

from .exemplar_errors import VITaskError

EP_MODES = ("cls", "all", "rep")


def feature_kind(ep_mode):
    """The TSM feature an EP mode uses: 'cls' (one token per image) or 'all' (the patch tokens)."""
    if ep_mode not in EP_MODES:
        raise VITaskError(f"ep_mode={ep_mode!r} is not an EP mode: use one of {', '.join(EP_MODES)}")
    return "cls" if ep_mode == "cls" else "all"


class ExemplarConnector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, mapping (B, D) or (B, T, D) TSM features to (B, T, H) tokens.

    The same shape as InternVL's own ``mlp1`` projector, which already maps a frozen
    vision feature into this LLM well; the normalisation matters because TSM features
    are unnormalised pre-logits whose scale differs between checkpoints. Training keeps it
    in float32 whatever the VLM's dtype (bf16 rounds small updates of a new module away).
    """

    def __init__(self, feature_dim, llm_hidden_size):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.proj = nn.Sequential(
            nn.LayerNorm(self.feature_dim),
            nn.Linear(self.feature_dim, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )

    def forward(self, features):
        if features.shape[-1] != self.feature_dim:
            raise VITaskError(
                f"exemplar features have size {features.shape[-1]} but the connector expects {self.feature_dim}: "
                "the TSM (or exemplar cache) is not the one this model was trained with"
            )
        if features.ndim == 2:  # one CLS feature per image -> one exemplar token
            features = features.unsqueeze(1)
        weight = self.proj[1].weight
        return self.proj(features.to(device=weight.device, dtype=weight.dtype))


def exemplar_spans(input_ids, img_context_token_id, ep_mode):
    """Per row, the (a, b) that :func:`splice_exemplars` replaces with the exemplar tokens.

    EP_cls / EP_all insert right after the row's last image token (a == b); EP_rep replaces the
    image tokens (a = first, b = last + 1). Positions index the padded row, either padding side.
    """
    feature_kind(ep_mode)  # refuses unknown modes
    is_image = input_ids == img_context_token_id
    positions = torch.arange(is_image.shape[1], device=is_image.device)
    first = torch.where(is_image, positions, is_image.shape[1]).amin(dim=1)
    last = torch.where(is_image, positions, -1).amax(dim=1) + 1
    spans = []
    for a, b in torch.stack([first, last], dim=1).tolist():  # one host sync for the batch
        if b == 0:
            raise VITaskError("a prompt has no image (<IMG_CONTEXT>) tokens: exemplar prompting needs one image "
                              "per sample")
        spans.append((a, b) if ep_mode == "rep" else (b, b))
    return spans


def _pad(rows, value, left):
    """Stack 1-D/2-D rows of different lengths, padding on the right or the left."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        if left:
            out[i, width - r.shape[0]:] = r
        else:
            out[i, :r.shape[0]] = r
    return out


def splice_exemplars(embeds, attention_mask, spans, tokens, labels=None, padding_side="right", ignore_index=-100):
    """Put ``tokens[i]`` (K, H) into row i of a padded batch, replacing ``embeds[i, a:b]`` for ``spans[i] = (a, b)``.

    ``a == b`` inserts (EP_cls / EP_all, beside the image tokens); ``a < b`` replaces (EP_rep).
    The batch may be right-padded (training) or left-padded (generation); the result is padded
    on ``padding_side``. Inserted positions are attended to and, when ``labels`` are given, carry
    ``ignore_index``. Returns ``(embeds, attention_mask, labels or None, position_ids)``, the mask
    in the input mask's dtype and position ids counting the attended positions from 0.
    """
    if padding_side not in ("right", "left"):
        raise VITaskError(f"padding_side={padding_side!r}: use 'right' or 'left'")
    if len(spans) != embeds.shape[0] or len(tokens) != embeds.shape[0]:
        raise VITaskError(f"{embeds.shape[0]} sequences but {len(spans)} spans and {len(tokens)} exemplars: "
                          "give one exemplar per sample")
    width = embeds.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    valid = attention_mask.sum(dim=1).tolist()  # one host sync for the batch, not one per row
    new_embeds, new_labels, lengths = [], [], []
    for i, (a, b) in enumerate(spans):
        n = int(valid[i])
        start, stop = (0, n) if padding_side == "right" else (width - n, width)
        if not start <= a <= b <= stop:
            raise VITaskError(f"exemplar span ({a}, {b}) of row {i} lies outside its {n} attended tokens: "
                              f"the batch is not {padding_side}-padded as stated")
        k = tokens[i].shape[0]
        new_embeds.append(torch.cat([embeds[i, start:a], tokens[i].to(embeds.dtype), embeds[i, b:stop]]))
        if labels is not None:
            new_labels.append(torch.cat([labels[i, start:a], labels.new_full((k,), ignore_index), labels[i, b:stop]]))
        lengths.append(n - (b - a) + k)
    left = padding_side == "left"
    embeds = _pad(new_embeds, 0.0, left)
    labels = _pad(new_labels, ignore_index, left) if labels is not None else None
    positions = torch.arange(embeds.shape[1], device=embeds.device)
    lengths = torch.tensor(lengths, device=embeds.device)[:, None]
    mask = (positions[None, :] >= embeds.shape[1] - lengths) if left else (positions[None, :] < lengths)
    position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return embeds, mask.to(attention_mask.dtype), labels, position_ids
