"""VITask data for XTuner's LLaVA: the same JSONL records, tokenized and preprocessed as XTuner's LLaVA recipes do.

Per record, XTuner's own functions build the token sequence (``llava_map_fn`` -> ``template_map_fn`` with the
recipe's ``PROMPT_TEMPLATE`` -> ``encode_fn`` with one ``IMAGE_TOKEN_INDEX`` for the image), and the image is
padded to a square in the processor's mean colour and run through the CLIP image processor (LLaVA's
``pad_image_to_square``, as ``xtuner chat`` does). The one placeholder is then written as one
``IMAGE_TOKEN_INDEX`` per image feature -- the sequence ``prepare_inputs_labels_for_multimodal`` builds in
XTuner's model -- so that VITask's splices work on positions of ``input_ids`` (``models.llava``).

Everything else -- up-front validation of every record, CRT negatives, TSM inputs or cached exemplars,
the collate -- is ``VITaskDataset``'s, unchanged: :class:`LLaVADatasetFormat` only replaces the
InternVL2 format below it (``VITaskLLaVADataset(VITaskDataset, LLaVADatasetFormat)``).
"""
import copy
import os
import sys
import types

from mmengine.config import ConfigDict
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig
from xtuner.dataset.map_fns import llava_map_fn, template_map_fn
from xtuner.dataset.utils import encode_fn, expand2square
from xtuner.utils import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PROMPT_TEMPLATE

from ..errors import VITaskError
from .internvl import InternVL2Dataset
from .vitask import VITaskDataset


def llava_template(template):
    """A private copy of an XTuner ``PROMPT_TEMPLATE`` (by name or as a dict)."""
    if isinstance(template, str):
        if template not in PROMPT_TEMPLATE:
            raise VITaskError(f"prompt template {template!r} is not one of XTuner's PROMPT_TEMPLATE names "
                              "(e.g. internlm2_chat, llama3_chat, vicuna)")
        template = PROMPT_TEMPLATE[template]
    return ConfigDict(copy.deepcopy(dict(template)))


class LLaVAImageTransform:
    """PIL image -> (3, H, W): pad to a square in the processor's mean colour (optional), CLIP preprocessing."""

    def __init__(self, image_processor, pad_image_to_square=True):
        self.image_processor, self.pad_image_to_square = image_processor, pad_image_to_square
        self.background = tuple(int(x * 255) for x in image_processor.image_mean)

    def __call__(self, image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.pad_image_to_square:
            image = expand2square(image, self.background)
        return self.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


class LLaVADatasetFormat(InternVL2Dataset):
    """XTuner's LLaVA format (tokenizer of the LLM folder, a PROMPT_TEMPLATE, the CLIP processor) under the
    project's dataset machinery. ``model_path`` is the LLM folder.

    Args (beyond ``InternVL2Dataset``'s data_paths, image_folders, max_length, repeat_times, validate):
        visual_encoder_path: the CLIP vision tower folder (its image processor and patch grid).
        template: an XTuner PROMPT_TEMPLATE name or dict (the LLaVA recipes: ``internlm2_chat``).
        system: system message ('' as XTuner's LLaVA recipes).
        pad_image_to_square: LLaVA's default (True).
    """

    require_image = True  # a LLaVA record without an image would get no image tokens at all

    def __init__(self, model_path, data_paths, image_folders=None, *, visual_encoder_path=None,
                 template="internlm2_chat", system="", pad_image_to_square=True, dynamic_image_size=False,
                 **kwargs):
        if visual_encoder_path is None:
            raise VITaskError(f"{type(self).__name__} needs visual_encoder_path=<the CLIP vision tower folder>")
        if dynamic_image_size:
            raise VITaskError("LLaVA takes one image per record: dynamic_image_size must be False")
        self.visual_encoder_path, self.pad_image_to_square = visual_encoder_path, pad_image_to_square
        super().__init__(model_path, data_paths, image_folders, template=template, system=system,
                         dynamic_image_size=False, **kwargs)

    def _init_format(self, model_path, template, system, dynamic_image_size, max_length):
        for what, path in (("LLM", model_path), ("visual encoder", self.visual_encoder_path)):
            if not os.path.isdir(path):
                raise VITaskError(f"the {what} folder {path} does not exist: download it (huggingface-cli download "
                                  "... --local-dir ...) and pass its folder")
        self.template = llava_template(template)
        self.cfg = types.SimpleNamespace(template=template if isinstance(template, str) else "custom")
        self._system = system or ""
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True, padding_side="right")
        self.image_processor = CLIPImageProcessor.from_pretrained(self.visual_encoder_path)
        vision = CLIPVisionConfig.from_pretrained(self.visual_encoder_path)
        self.image_size = vision.image_size
        self.patch_token = (vision.image_size // vision.patch_size) ** 2  # features per image (CLS dropped)
        self.min_dynamic_patch = self.max_dynamic_patch = 1
        self.use_thumbnail, self.downsample_ratio = False, 1.0
        self.transformer = LLaVAImageTransform(self.image_processor, self.pad_image_to_square)

    @classmethod
    def format_only(cls, model_path, visual_encoder_path, template="internlm2_chat", system="", max_length=8192,
                    pad_image_to_square=True):
        """The format of an LLM + vision tower with no records (evaluation)."""
        self = cls.__new__(cls)
        self.visual_encoder_path, self.pad_image_to_square = visual_encoder_path, pad_image_to_square
        LLaVADatasetFormat._init_format(self, model_path, template, system, False, max_length)
        self.data_paths, self.data, self.image_folder, self.lines, self.group_length = [], [], [], [], []
        return self

    # ---- tokenization (XTuner's LLaVA functions) ------------------------------------------------
    def encode(self, conversations, with_output=True):
        """(input_ids, labels) with ONE ``IMAGE_TOKEN_INDEX`` for the image, as XTuner's LLaVADataset builds them;
        ``with_output=False``: the prompt of a one-turn record only, as ``xtuner chat`` builds it."""
        example = llava_map_fn({"conversations": copy.deepcopy(conversations)})
        if self._system and example["conversation"]:
            example["conversation"][0]["system"] = self._system
        example = template_map_fn(example, template=self.template)
        encoded = encode_fn(example, self.tokenizer, sys.maxsize, input_ids_with_output=with_output,
                            with_image_token=True)
        return encoded["input_ids"], encoded["labels"]

    def expand_image_tokens(self, input_ids, labels):
        """One ``IMAGE_TOKEN_INDEX`` per image feature (labels: ignored there)."""
        ids, labs = [], []
        for token, label in zip(input_ids, labels):
            if token == IMAGE_TOKEN_INDEX:
                ids += [IMAGE_TOKEN_INDEX] * self.patch_token
                labs += [IGNORE_INDEX] * self.patch_token
            else:
                ids.append(token)
                labs.append(label)
        return ids, labs

    def get_inputid_labels(self, conversations, image_token_str=None):
        input_ids, labels = self.expand_image_tokens(*self.encode(conversations))
        return {"input_ids": input_ids[:self.max_length], "labels": labels[:self.max_length]}

    def _untruncated_length(self, conversations, with_image):
        """(tokens, end of the image tokens) with one image token, for ``validate``'s length check."""
        input_ids, _ = self.encode(conversations)
        image_end = input_ids.index(IMAGE_TOKEN_INDEX) + 1 if IMAGE_TOKEN_INDEX in input_ids else 0
        return len(input_ids), image_end

    # ---- samples ------------------------------------------------------------------------------
    def prepare_data(self, index):
        record = self.data[index]
        image = self.get_image(os.path.join(self.image_folder[index], record["image"]))
        item = self.get_inputid_labels(record["conversations"])
        if IMAGE_TOKEN_INDEX not in item["input_ids"]:
            raise VITaskError(f"record {record.get('id', index)}: its instruction has no <image>")
        item["pixel_values"] = self.transformer(image).unsqueeze(0)  # (1, 3, H, W): one "tile"
        return item


class VITaskLLaVADataset(VITaskDataset, LLaVADatasetFormat):
    """``VITaskDataset`` (labels, TSM inputs or exemplars, CRT negatives, validation) in XTuner's LLaVA format.

    Args: ``model_path`` = the LLM folder, ``visual_encoder_path``, ``template``, ``system``,
    ``pad_image_to_square`` as :class:`LLaVADatasetFormat`; the rest as ``VITaskDataset``.
    """

