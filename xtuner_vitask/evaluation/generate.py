"""Classification by free-text generation: greedy answers to the training prompts, parsed back to labels.

The prompt of each record is exactly its training prompt (the dataset's chat template, system
message and image tiling), cut before the response; decoding is greedy and stops at the
template's turn-end token. Parsing into labels is :func:`xtuner_vitask.data.medmnist.parse_response`
(the formats data_tools writes); an answer it cannot parse stays ``None`` -- never mapped to a class.
"""
import os

import torch
from tqdm import tqdm

from ..errors import VITaskError


def prompt_ids(dataset, record, n_tiles):
    """Token ids of the record's training prompt (system + instruction with image tokens), no response."""
    from .ranking import _image_token_str

    human = next(t for t in record["conversations"] if t["from"] == "human")
    seq = dataset.get_inputid_labels([dict(human), {"from": "gpt", "value": ""}],
                                     _image_token_str(dataset, n_tiles))
    first_target = next((i for i, label in enumerate(seq["labels"]) if label != -100), len(seq["input_ids"]))
    return seq["input_ids"][:first_target]


def image_tiles(dataset, path):
    """(tiles, PIL image) of one image, tiled as in training."""
    from xtuner.dataset.internvl_dataset import dynamic_preprocess

    image = dataset.get_image(path)
    crops = dynamic_preprocess(image, dataset.min_dynamic_patch, dataset.max_dynamic_patch, dataset.image_size,
                               dataset.use_thumbnail)
    return torch.stack([dataset.transformer(c) for c in crops]), image


def stop_token_ids(dataset):
    """The template's stop words that are single tokens (generation ends at them)."""
    tokenizer = dataset.tokenizer
    ids = []
    for word in list(dataset.template.get("STOP_WORDS", [])) + [tokenizer.eos_token]:
        if word is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(word)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def clean_answer(text, dataset):
    for word in dataset.template.get("STOP_WORDS", []):
        text = text.split(word)[0]
    return text.strip()


@torch.no_grad()
def generate_batch(hf_model, dataset, records, image_folder, use_ep=None, max_new_tokens=32, tsm_transform=None):
    """Greedy answers (strings) of ``hf_model`` (an InternVLChatModel, or VITask's EP subclass) for a batch.

    ``use_ep`` None calls the plain ``generate``; True/False is passed on (EP export only).
    """
    tokenizer = dataset.tokenizer
    device = hf_model.language_model.get_input_embeddings().weight.device
    tiles, prompts, tsm_pixels = [], [], []
    for record in records:
        t, image = image_tiles(dataset, os.path.join(image_folder, record["image"]))
        tiles.append(t)
        prompts.append(prompt_ids(dataset, record, t.shape[0]))
        if use_ep:
            tsm_pixels.append(tsm_transform(image))
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: generation continues on the right
        input_ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    hf_model.img_context_token_id = tokenizer.convert_tokens_to_ids(dataset.IMG_CONTEXT_TOKEN)
    stops = stop_token_ids(dataset)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops or None,
                  pad_token_id=pad)
    if use_ep is not None:
        kwargs["use_ep"] = use_ep
        if use_ep:
            kwargs["tsm_pixel_values"] = torch.stack(tsm_pixels).to(device)
    pixel_values = torch.cat(tiles).to(device=device, dtype=hf_model.vision_model.dtype)
    out = hf_model.generate(pixel_values=pixel_values, input_ids=input_ids.to(device),
                            attention_mask=mask.to(device), **kwargs)
    if out.shape[1] > width and torch.equal(out[:, :width].cpu(), input_ids):  # some LLMs echo the prompt
        out = out[:, width:]
    return [clean_answer(t, dataset) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def generate_records(hf_model, dataset, records, image_folder, use_ep=None, batch_size=8, max_new_tokens=32,
                     tsm_transform=None, progress=True, desc="generate"):
    """Answers for all records, in batches, with a progress bar."""
    if use_ep and tsm_transform is None:
        raise VITaskError("EP generation needs the TSM's image transform (load the EP export)")
    hf_model.eval()
    answers = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, unit="batch"):
        answers += generate_batch(hf_model, dataset, records[start:start + batch_size], image_folder, use_ep,
                                  max_new_tokens, tsm_transform)
    return answers
