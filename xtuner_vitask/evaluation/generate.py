"""Classification by free-text generation: greedy answers to the training prompts, parsed back to labels.

The prompt of each record is exactly its training prompt (:class:`.inputs.ModelInputs`), cut before
the response; decoding is greedy and stops at the template's turn-end token. Parsing the answers
into labels is the caller's (:mod:`.evaluate`); an answer that does not parse stays unparsable.
"""
import torch
from tqdm import tqdm

from ..errors import VITaskError


@torch.no_grad()
def generate_batch(hf_model, inputs, batch, use_ep=None, max_new_tokens=32):
    """Greedy answers (strings) of ``hf_model`` (an InternVLChatModel, or VITask's EP subclass) for a batch.

    ``use_ep`` None calls the plain ``generate``; True/False is passed on (EP export only).
    """
    device = hf_model.language_model.get_input_embeddings().weight.device
    width = max(len(p) for p in batch.prompts)
    pad = inputs.pad_id
    input_ids = torch.full((len(batch.prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch.prompts), width), dtype=torch.long)
    for i, p in enumerate(batch.prompts):  # left padding: generation continues on the right
        input_ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    hf_model.img_context_token_id = inputs.img_context_id
    stops = inputs.stop_ids()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops or None,
                  pad_token_id=pad)
    if use_ep is not None:
        kwargs["use_ep"] = use_ep
        if use_ep:
            kwargs["tsm_pixel_values"] = batch.tsm_pixels.to(device)
    pixel_values = torch.cat(batch.tiles).to(device=device, dtype=hf_model.vision_model.dtype)
    out = hf_model.generate(pixel_values=pixel_values, input_ids=input_ids.to(device),
                            attention_mask=mask.to(device), **kwargs)
    if out.shape[1] > width and torch.equal(out[:, :width].cpu(), input_ids):  # some LLMs echo the prompt
        out = out[:, width:]
    return [inputs.clean_answer(t) for t in inputs.tokenizer.batch_decode(out, skip_special_tokens=True)]


def generate_records(hf_model, inputs, records, image_folder, use_ep=None, batch_size=8, max_new_tokens=32,
                     progress=True, desc="generate"):
    """Answers for all records, in batches, with a progress bar."""
    if use_ep and inputs.tsm_transform is None:
        raise VITaskError("EP generation needs the TSM's image transform (load the EP export)")
    hf_model.eval()
    answers = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = inputs.batch(records[start:start + batch_size], image_folder, tsm=bool(use_ep))
        answers += generate_batch(hf_model, inputs, batch, use_ep, max_new_tokens)
    return answers


def default_max_new_tokens(inputs, candidates):
    """Room for the longest candidate answer plus a few tokens (a model may add words before stopping)."""
    return max(len(inputs.tokenizer(c[0], add_special_tokens=False).input_ids) for c in candidates) + 8
