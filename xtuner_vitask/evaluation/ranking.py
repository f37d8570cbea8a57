"""Classification by likelihood ranking: score every candidate response's
log-probability given the image and instruction, predict the best one.

No free-text parsing is involved, so it is exact and cheap: one ViT encode per
image and one LLM pass per (image, candidate) pair, with no decoding loop.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from ..data.medmnist import format_response
from ..errors import VITaskError


def candidate_responses(meta, task=None, train_records=None):
    """Responses to rank, with the label indices each stands for.

    Single-label sets: one per class (its label name). Multi-label sets: "no finding",
    each single finding, and every other combination seen in ``train_records``.
    """
    task_meta = meta.get("tasks", {}).get(task, meta)
    names, kind = task_meta["label_names"], task_meta["task_type"]
    if kind != "multi-label":
        return [(format_response(kind, names, [c]), [c]) for c in range(len(names))]
    combos = {(): None, **{(c,): None for c in range(len(names))}}
    for record in train_records or ():
        combos.setdefault(tuple(sorted(record["label"])), None)
    return [(format_response(kind, names, list(c)), list(c)) for c in combos]


def _image_token_str(dataset, n_tiles):
    return f"{dataset.IMG_START_TOKEN}{dataset.IMG_CONTEXT_TOKEN * (n_tiles * dataset.patch_token)}{dataset.IMG_END_TOKEN}"


def pad_sequences(seqs, pad_id, device):
    """Right-pad tokenised samples ({'input_ids', 'labels'}) -> input_ids, labels, attention mask, positions."""
    width = max(len(s["input_ids"]) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), True
    positions = torch.arange(width).expand(len(seqs), -1)
    return input_ids.to(device), labels.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def rank_batch(model, dataset, records, image_folder, candidates, use_ep=False, exemplars=None):
    """Log-likelihood (B, C) of each candidate response for each record, one full sequence per pair.

    The reference implementation (``prefix_rank.rank_batch_shared_prefix`` gives the same scores
    with the prompt computed once). ``dataset`` (an InternVL2Dataset built on the model's
    checkpoint) supplies the chat template, tokenizer and image transforms, so prompts are exactly
    the training prompts.
    """
    from .generate import image_tiles

    device = next(model.parameters()).device
    tiles, tsm_pixels, seqs = [], [], []
    for record in records:
        record_tiles, image = image_tiles(dataset, os.path.join(image_folder, record["image"]))
        tiles.append(record_tiles)
        if use_ep and exemplars is None:
            tsm_pixels.append(dataset.tsm_transform(image))
        human = next(t for t in record["conversations"] if t["from"] == "human")
        for response, _ in candidates:
            conv = [dict(human), {"from": "gpt", "value": response}]
            seqs.append(dataset.get_inputid_labels(conv, _image_token_str(dataset, record_tiles.shape[0])))

    n_cand = len(candidates)
    input_ids, labels, mask, positions = pad_sequences(seqs, dataset.tokenizer.pad_token_id or 0, device)
    vit = model.encode_images(torch.cat(tiles).to(device))
    first = np.cumsum([0] + [t.shape[0] for t in tiles])
    seq_vit = torch.cat([vit[first[b]:first[b + 1]] for b in range(len(records)) for _ in range(n_cand)])
    embeds = model.embed_tokens(input_ids, seq_vit)
    if use_ep:
        from ..ep.exemplar_prompting import splice_exemplars

        data = {"exemplars": exemplars} if exemplars is not None else {"tsm_pixel_values": torch.stack(tsm_pixels)}
        tokens = model.exemplar_tokens({k: v.to(device) for k, v in data.items()}).repeat_interleave(n_cand, dim=0)
        embeds, mask, labels, positions = splice_exemplars(embeds, mask, model.exemplar_spans(input_ids), tokens, labels=labels)
    logits, targets = model.response_logits(embeds, mask, positions, labels)
    token_logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    seq_of_row = (labels[:, 1:] != -100).nonzero()[:, 0]
    scores = torch.zeros(len(seqs), device=device).index_add_(0, seq_of_row, token_logp)
    return scores.view(len(records), n_cand).cpu()


def rank_records(model, dataset, records, image_folder, candidates, use_ep=False, batch_size=8, exemplars=None,
                 progress=True, desc="rank", shared_prefix=True):
    """Scores (N, C) for all records, in batches, with a progress bar.

    ``shared_prefix`` runs each prompt once and only the candidates' tokens per candidate
    (:mod:`.prefix_rank`, same scores, several times faster); False runs full sequences.
    """
    from .prefix_rank import rank_batch_shared_prefix

    score_batch = rank_batch_shared_prefix if shared_prefix else rank_batch
    if use_ep and not hasattr(model, "exemplar_tokens"):
        raise VITaskError("EP evaluation needs a VITask model with its TSM and connector (this one has none)")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = records[start:start + batch_size]
            ex = None if exemplars is None else exemplars[[r["id"] for r in batch]]
            out.append(score_batch(model, dataset, batch, image_folder, candidates, use_ep, ex))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(candidates))
