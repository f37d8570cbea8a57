"""Likelihood ranking with the prompt computed once: the same scores as :func:`.ranking.rank_batch`,
much less work.

``rank_batch`` runs every (image, candidate) pair as a full sequence, so the prompt -- system text,
instruction and the image tokens (256 per tile on InternVL2) -- goes through the LLM once per
candidate. Here each record's prompt runs once (left-padded, KV cache kept), the cache is repeated
for the C candidates, and only the candidates' few tokens run again: about one prompt pass plus one
short pass, against the prompt pass plus one pass per generated token of greedy decoding.
"""
import torch

from ..errors import VITaskError
from .generate import image_tiles, prompt_ids


def candidate_tokens(dataset, record, candidates, n_tiles):
    """Per candidate: (token ids, target mask) that follow the prompt -- the response and the turn end,
    tokenized exactly as training does (XTuner encodes the answer apart from the prompt)."""
    from .ranking import _image_token_str

    human = next(t for t in record["conversations"] if t["from"] == "human")
    prompt = prompt_ids(dataset, record, n_tiles)
    out = []
    for response, _ in candidates:
        seq = dataset.get_inputid_labels([dict(human), {"from": "gpt", "value": response}],
                                         _image_token_str(dataset, n_tiles))
        if seq["input_ids"][:len(prompt)] != prompt:
            raise VITaskError("the prompt's tokens change with the response: this chat template cannot share "
                              "the prompt between candidates (use ranking.rank_batch)")
        out.append((seq["input_ids"][len(prompt):], [lab != -100 for lab in seq["labels"][len(prompt):]]))
    return out


def _left_align(embeds, mask):
    """Right-padded (B, L, H) + mask -> left-padded, so every prompt ends at the last position."""
    lengths = mask.sum(1)
    out, new_mask = torch.zeros_like(embeds), torch.zeros_like(mask)
    width = embeds.shape[1]
    for i, n in enumerate(lengths.tolist()):
        out[i, width - n:], new_mask[i, width - n:] = embeds[i, :n], True
    return out, new_mask


@torch.no_grad()
def rank_batch_shared_prefix(model, dataset, records, image_folder, candidates, use_ep=False, exemplars=None):
    """Log-likelihood (B, C) of each candidate response for each record (see module docstring)."""
    import os

    device = next(model.parameters()).device
    tiles, tsm_pixels, prompts = [], [], []
    for record in records:
        t, image = image_tiles(dataset, os.path.join(image_folder, record["image"]))
        tiles.append(t)
        prompts.append(prompt_ids(dataset, record, t.shape[0]))
        if use_ep and exemplars is None:
            tsm_pixels.append(dataset.tsm_transform(image))
    if len({t.shape[0] for t in tiles}) != 1:
        raise VITaskError("images of a batch have different tile counts: evaluate with one tile per image")
    cands = candidate_tokens(dataset, records[0], candidates, tiles[0].shape[0])

    # the prompts, right-padded for embedding (and EP splicing), then left-aligned
    width = max(len(p) for p in prompts)
    pad = dataset.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        input_ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), True
    input_ids, mask = input_ids.to(device), mask.to(device)
    embeds = model.embed_tokens(input_ids, model.encode_images(torch.cat(tiles).to(device)))
    if use_ep:
        from ..ep.exemplar_prompting import splice_exemplars

        data = {"exemplars": exemplars} if exemplars is not None else {"tsm_pixel_values": torch.stack(tsm_pixels)}
        tokens = model.exemplar_tokens({k: v.to(device) for k, v in data.items()})
        labels = torch.full(input_ids.shape, -100, dtype=torch.long, device=device)
        embeds, mask, _, _ = splice_exemplars(embeds, mask, model.exemplar_spans(input_ids), tokens, labels=labels)
    embeds, mask = _left_align(embeds, mask)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)

    lm = model.model.language_model
    decoder, head = model.decoder_and_head()
    out = decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                  return_dict=True)
    n_rec, n_cand = len(records), len(candidates)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_cand)

    # the candidates' tokens after every prompt
    cont_len = max(len(ids) for ids, _ in cands)
    cont_ids = torch.full((n_cand, cont_len), pad, dtype=torch.long)
    cont_mask = torch.zeros((n_cand, cont_len), dtype=torch.bool)
    target = torch.zeros((n_cand, cont_len), dtype=torch.bool)
    for c, (ids, is_target) in enumerate(cands):
        cont_ids[c, :len(ids)], cont_mask[c, :len(ids)], target[c, :len(ids)] = torch.tensor(ids), True, \
            torch.tensor(is_target)
    cont_ids, cont_mask, target = (x.to(device).repeat(n_rec, 1) for x in (cont_ids, cont_mask, target))
    cont_embeds = lm.get_input_embeddings()(cont_ids)
    full_mask = torch.cat([mask.repeat_interleave(n_cand, 0), cont_mask], 1).long()
    cont_pos = positions[:, -1:].repeat_interleave(n_cand, 0) + 1 + torch.arange(cont_len, device=device)
    hidden = decoder(inputs_embeds=cont_embeds, attention_mask=full_mask, position_ids=cont_pos,
                     past_key_values=cache, use_cache=True, return_dict=True).last_hidden_state
    # token j is predicted by the hidden state before it: the prompt's last one for j = 0
    before = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(n_cand, 0), hidden[:, :-1]], 1)
    logp = torch.log_softmax(head(before[target]).float(), -1).gather(-1, cont_ids[target][:, None]).squeeze(-1)
    seq_of_row = target.nonzero()[:, 0]
    scores = torch.zeros(n_rec * n_cand, device=device).index_add_(0, seq_of_row, logp)
    return scores.view(n_rec, n_cand).cpu()
