"""Classification by likelihood ranking: the log-probability of every candidate response (each label
name, or label combination) given the image and instruction; the best one is the prediction.

Nothing is parsed, so it is exact. Two strategies give the same scores (a test holds them to 1e-4):

- ``"shared-prefix"`` (default): each record's prompt -- system text, instruction and the image
  tokens (256 per tile on InternVL2) -- runs through the LLM once, left-padded with its KV cache
  kept; the cache is repeated for the C candidates and only the candidates' few tokens run again.
- ``"full-sequence"`` (the reference): one full training sequence per (record, candidate) pair,
  C prompt passes per record.

Both work on any cache the LLM returns: transformers ``Cache`` objects and the legacy tuples of
InternVL2's own InternLM2 code.
"""
import numpy as np
import torch
from tqdm import tqdm

from ..contract import MULTI_LABEL
from ..errors import VITaskError
from ..formats import format_response
from .inputs import human_turn
from .kv_cache import repeat_kv_cache

STRATEGIES = ("shared-prefix", "full-sequence")


def candidate_responses(task, train_records=None):
    """Responses to rank for a task (the contract's TaskMeta), with the label indices each stands for.

    Single-label tasks: one per class (its label name), in class order. Multi-label tasks: "no
    finding", each single finding, and every other combination seen in ``train_records``.
    """
    names, kind = list(task.label_names), task.task_type
    if kind != MULTI_LABEL:
        return [(format_response(kind, names, [c]), [c]) for c in range(len(names))]
    combos = {(): None, **{(c,): None for c in range(len(names))}}
    for record in train_records or ():
        label = record.get("label") or []
        if all(isinstance(c, int) and 0 <= c < len(names) for c in label):
            combos.setdefault(tuple(sorted(label)), None)
    return [(format_response(kind, names, list(c)), list(c)) for c in combos]


def best_labels(scores, candidates):
    """Label indices of each row's best candidate."""
    return [list(candidates[b][1]) for b in scores.argmax(1).tolist()]


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


def exemplar_inputs(batch, exemplars, device):
    """The EP input of a batch: cached exemplars (by record id) or the TSM's pixels."""
    if exemplars is not None:
        return {"exemplars": exemplars[[r["id"] for r in batch.records]].to(device)}
    if batch.tsm_pixels is None:
        raise VITaskError("EP ranking needs the TSM's pixels or cached exemplars")
    return {"tsm_pixel_values": batch.tsm_pixels.to(device)}


def splice_exemplars(model, embeds, mask, labels, input_ids, data, repeat=1):
    """Embeddings with the EP tokens put where training puts them (the model's own spans and splice)."""
    from ..ep.exemplar_prompting import splice_exemplars as splice

    tokens = model.exemplar_tokens(data)
    if repeat > 1:
        tokens = tokens.repeat_interleave(repeat, dim=0)
    return splice(embeds, mask, model.exemplar_spans(input_ids), tokens, labels=labels)


@torch.no_grad()
def score_full_sequences(model, inputs, batch, candidates, use_ep=False, exemplars=None):
    """(B, C) log-likelihoods, one full sequence per (record, candidate) pair (the reference)."""
    device = next(model.parameters()).device
    seqs = []
    for record, n_tiles in zip(batch.records, batch.n_tiles):
        human = dict(human_turn(record))
        for response, _ in candidates:
            seqs.append(inputs.sequence([human, {"from": "gpt", "value": response}], n_tiles))
    n_cand = len(candidates)
    input_ids, labels, mask, positions = pad_sequences(seqs, inputs.pad_id, device)
    vit = model.encode_images(torch.cat(batch.tiles).to(device))
    first = np.cumsum([0] + batch.n_tiles)
    seq_vit = torch.cat([vit[first[b]:first[b + 1]] for b in range(len(batch.records)) for _ in range(n_cand)])
    embeds = model.embed_tokens(input_ids, seq_vit)
    if use_ep:
        embeds, mask, labels, positions = splice_exemplars(model, embeds, mask, labels, input_ids,
                                                           exemplar_inputs(batch, exemplars, device), n_cand)
    logits, targets = model.response_logits(embeds, mask, positions, labels)
    token_logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    seq_of_row = (labels[:, 1:] != -100).nonzero()[:, 0]
    scores = torch.zeros(len(seqs), device=device).index_add_(0, seq_of_row, token_logp)
    return scores.view(len(batch.records), n_cand).cpu()


def _left_align(embeds, mask):
    """Right-padded (B, L, H) + mask -> left-padded, so every prompt ends at the last position."""
    out, new_mask = torch.zeros_like(embeds), torch.zeros_like(mask)
    width = embeds.shape[1]
    for i, n in enumerate(mask.sum(1).tolist()):
        out[i, width - n:], new_mask[i, width - n:] = embeds[i, :n], True
    return out, new_mask


@torch.no_grad()
def score_shared_prefix(model, inputs, batch, candidates, use_ep=False, exemplars=None):
    """(B, C) log-likelihoods with each prompt computed once (see the module docstring)."""
    device = next(model.parameters()).device
    cands = inputs.continuations(batch.records[0], [c[0] for c in candidates], batch.n_tiles[0])

    # the prompts, right-padded for embedding (and EP splicing), then left-aligned
    pad = inputs.pad_id
    width = max(len(p) for p in batch.prompts)
    input_ids = torch.full((len(batch.prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch.prompts), width), dtype=torch.bool)
    for i, p in enumerate(batch.prompts):
        input_ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), True
    input_ids, mask = input_ids.to(device), mask.to(device)
    embeds = model.embed_tokens(input_ids, model.encode_images(torch.cat(batch.tiles).to(device)))
    if use_ep:
        labels = torch.full(input_ids.shape, -100, dtype=torch.long, device=device)
        embeds, mask, _, _ = splice_exemplars(model, embeds, mask, labels, input_ids,
                                              exemplar_inputs(batch, exemplars, device))
    embeds, mask = _left_align(embeds, mask)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)

    decoder, head = model.decoder_and_head()
    out = decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                  return_dict=True)
    n_rec, n_cand = len(batch.records), len(candidates)
    cache = repeat_kv_cache(out.past_key_values, n_cand)

    # the candidates' tokens after every prompt
    cont_len = max(len(ids) for ids, _ in cands)
    cont_ids = torch.full((n_cand, cont_len), pad, dtype=torch.long)
    cont_mask = torch.zeros((n_cand, cont_len), dtype=torch.bool)
    target = torch.zeros((n_cand, cont_len), dtype=torch.bool)
    for c, (ids, is_target) in enumerate(cands):
        cont_ids[c, :len(ids)], cont_mask[c, :len(ids)] = torch.tensor(ids), True
        target[c, :len(ids)] = torch.tensor(is_target)
    cont_ids, cont_mask, target = (x.to(device).repeat(n_rec, 1) for x in (cont_ids, cont_mask, target))
    cont_embeds = model.model.language_model.get_input_embeddings()(cont_ids)
    full_mask = torch.cat([mask.repeat_interleave(n_cand, 0), cont_mask], 1).long()
    cont_pos = positions[:, -1:].repeat_interleave(n_cand, 0) + 1 + torch.arange(cont_len, device=device)
    hidden = decoder(inputs_embeds=cont_embeds, attention_mask=full_mask, position_ids=cont_pos,
                     past_key_values=cache, use_cache=True, return_dict=True).last_hidden_state
    # token j is predicted by the hidden state before it: the prompt's last one for j = 0
    before = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(n_cand, 0), hidden[:, :-1]], 1)
    logp = torch.log_softmax(head(before[target]).float(), -1).gather(-1, cont_ids[target][:, None]).squeeze(-1)
    scores = torch.zeros(n_rec * n_cand, device=device).index_add_(0, target.nonzero()[:, 0], logp)
    return scores.view(n_rec, n_cand).cpu()


SCORERS = {"shared-prefix": score_shared_prefix, "full-sequence": score_full_sequences}


def rank_records(model, inputs, records, image_folder, candidates, use_ep=False, batch_size=8, exemplars=None,
                 strategy="shared-prefix", progress=True, desc="rank"):
    """Scores (N, C) of all records, in batches, with a progress bar."""
    if strategy not in SCORERS:
        raise VITaskError(f"ranking strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if use_ep and not hasattr(model, "exemplar_tokens"):
        raise VITaskError("EP evaluation needs a VITask model with its TSM and connector (this one has none)")
    score = SCORERS[strategy]
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = inputs.batch(records[start:start + batch_size], image_folder, tsm=use_ep and exemplars is None)
            out.append(score(model, inputs, batch, candidates, use_ep, exemplars))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(candidates))
