"""One input processor for every path that runs a model on a record: ranking, generation, the
response-ranking analysis (Fig. 4), the eval hook and chat.

:class:`ModelInputs` turns a record (or a chat turn) into what the model takes -- the token ids of
the prompt exactly as training built it (XTuner's ``get_inputid_labels`` with the training chat
template and system text), InternVL's image tiles, the TSM's pixels, and the template's stop
tokens. Training-time evaluation builds it on the training dataset itself, so prompts are the
training prompts by construction; exports and chat build it from the model folder.
"""
import copy
import os
from dataclasses import dataclass, field

import torch

from ..errors import VITaskError


def read_image(path):
    """The image as 8-bit RGB through the project's one reader (16-bit and float images rescaled as in training)."""
    from ..data.images import read_image as read_8bit

    return read_8bit(path, "RGB")


def check_image_file(path, fix):
    """The image's header and integrity (cheap: no decoding) before a model loads; one VITaskError naming
    the file, what is wrong and ``fix``."""
    from ..data.images import probe_image

    try:
        probe_image(path)
    except VITaskError as err:
        raise VITaskError(f"{path}: {err}: {fix}") from None


def human_turn(record):
    """The record's instruction turn (the first 'human' one)."""
    turn = next((t for t in record.get("conversations", ()) if t.get("from") == "human"), None)
    if turn is None:
        raise VITaskError(f"record {record.get('id')} has no 'human' turn in 'conversations': regenerate the "
                          "JSONL with data_tools")
    return turn


@dataclass
class Batch:
    """A batch of records made ready for a model: tiles per image, TSM pixels, prompt token ids."""
    records: list
    tiles: list  # per record (n_tiles, 3, H, W)
    prompts: list  # per record: prompt token ids (no response)
    tsm_pixels: torch.Tensor | None = None  # (B, 3, S, S)
    extra: dict = field(default_factory=dict)

    @property
    def n_tiles(self):
        return [t.shape[0] for t in self.tiles]


class ModelInputs:
    """Prompts, tiles, TSM pixels and stop ids of one model's format.

    Args:
        fmt: an ``InternVL2Dataset`` (the training dataset in the eval hook; otherwise
            ``InternVL2Dataset.format_only(model_path)``): its tokenizer, chat template, system
            text, tiling and ``get_inputid_labels`` define the prompt.
        tsm_transform: PIL image -> TSM pixels (EP); None when there is no TSM in the loop.
    """

    def __init__(self, fmt, tsm_transform=None):
        self.fmt = fmt
        self.tsm_transform = tsm_transform

    @classmethod
    def for_model(cls, model_path, tsm_transform=None, template=None, system=None, max_tiles=1):
        """The format of a model folder (its config's chat template); ``max_tiles`` > 1 tiles dynamically."""
        from ..datasets.internvl import InternVL2Dataset

        fmt = InternVL2Dataset.format_only(model_path, template=template, system=system,
                                           dynamic_image_size=max_tiles > 1)
        fmt.max_dynamic_patch = max(1, int(max_tiles))
        return cls(fmt, tsm_transform)

    # ---- the pieces ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.fmt.tokenizer

    @property
    def template(self):
        return self.fmt.template

    @property
    def pad_id(self):
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    @property
    def img_context_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.fmt.IMG_CONTEXT_TOKEN)

    def image_token_str(self, n_tiles):
        fmt = self.fmt
        return f"{fmt.IMG_START_TOKEN}{fmt.IMG_CONTEXT_TOKEN * (n_tiles * fmt.patch_token)}{fmt.IMG_END_TOKEN}"

    def tiles(self, image):
        """(n_tiles, 3, H, W) InternVL tiles of a PIL image, tiled as in training."""
        from xtuner.dataset.internvl_dataset import dynamic_preprocess

        fmt = self.fmt
        crops = dynamic_preprocess(image, fmt.min_dynamic_patch, fmt.max_dynamic_patch, fmt.image_size,
                                   fmt.use_thumbnail)
        return torch.stack([fmt.transformer(c) for c in crops])

    def tsm_pixels(self, image):
        if self.tsm_transform is None:
            raise VITaskError("EP needs the TSM's image transform: load the EP export (or a dataset with a TSM)")
        return self.tsm_transform(image)

    def sequence(self, conversations, n_tiles):
        """{'input_ids', 'labels'} of a conversation, exactly as training tokenizes it."""
        return self.fmt.get_inputid_labels(copy.deepcopy(list(conversations)), self.image_token_str(n_tiles))

    def prompt_ids(self, conversations, n_tiles):
        """Token ids of a conversation that ends with a human turn, up to where the answer starts.

        The answer is encoded apart from the prompt (as XTuner does), so these ids are a prefix of
        every training sequence with that prompt.
        """
        conversations = list(conversations)
        seq = self.sequence(conversations + [{"from": "gpt", "value": ""}], n_tiles)
        suffix = self.template.get("SUFFIX") or ""
        n_answer = len(self.tokenizer.encode(suffix, add_special_tokens=False)) if suffix else 0
        return seq["input_ids"][:len(seq["input_ids"]) - n_answer]

    def record_prompt_ids(self, record, n_tiles):
        return self.prompt_ids([dict(human_turn(record))], n_tiles)

    def continuations(self, record, responses, n_tiles):
        """Per response: (token ids after the prompt, target mask) -- the response and the turn end."""
        human = dict(human_turn(record))
        prompt = self.record_prompt_ids(record, n_tiles)
        out = []
        for response in responses:
            seq = self.sequence([human, {"from": "gpt", "value": response}], n_tiles)
            if seq["input_ids"][:len(prompt)] != prompt:
                raise VITaskError("the prompt's tokens change with the response: this chat template cannot share "
                                  "the prompt between candidates (rank with strategy='full-sequence')")
            out.append((seq["input_ids"][len(prompt):], [lab != -100 for lab in seq["labels"][len(prompt):]]))
        return out

    def stop_ids(self):
        """The template's stop words that are single tokens, and EOS (generation ends at them)."""
        tokenizer, ids = self.tokenizer, []
        for word in list(self.template.get("STOP_WORDS", [])) + [tokenizer.eos_token]:
            if not word:
                continue
            tid = tokenizer.convert_tokens_to_ids(word)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def clean_answer(self, text):
        for word in self.template.get("STOP_WORDS", []):
            text = text.split(word)[0]
        return text.strip()

    # ---- records ------------------------------------------------------------------------------
    def image_path(self, record, image_folder):
        return os.path.join(image_folder, record["image"])

    def batch(self, records, image_folder, image_records=None, tsm=False):
        """Tiles, prompt ids (and TSM pixels with ``tsm``) of ``records``; the images are those of
        ``image_records`` when given (Fig. 4 shows a record's prompt with another record's image)."""
        tiles, prompts, pixels = [], [], []
        for record, shown in zip(records, image_records or records):
            image = read_image(self.image_path(shown, image_folder))
            t = self.tiles(image)
            tiles.append(t)
            prompts.append(self.record_prompt_ids(record, t.shape[0]))
            if tsm:
                pixels.append(self.tsm_pixels(image))
        return Batch(records=list(records), tiles=tiles, prompts=prompts,
                     tsm_pixels=torch.stack(pixels) if tsm else None)
