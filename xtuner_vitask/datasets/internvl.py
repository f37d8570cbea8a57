"""XTuner's InternVL dataset for every InternVL2 chat format.

XTuner 0.2.0's ``InternVL_V1_5_Dataset.__init__`` raises for LLMs other than
InternLM2 and Phi3, edits the shared ``PROMPT_TEMPLATE`` dict in place and always
tiles images dynamically. This subclass replaces only ``__init__`` (format from
the config's ``template``, a private copy of it, ``dynamic_image_size`` honoured)
and keeps XTuner's image tiling, tokenisation and label masking as they are.
"""
import copy
import os

import numpy as np
from mmengine import print_log
from mmengine.config import ConfigDict
from transformers import AutoTokenizer
from xtuner.dataset import InternVL_V1_5_Dataset
from xtuner.dataset.internvl_dataset import load_json_or_jsonl

from ..errors import VITaskError
from ..models.internvl import load_internvl_config
from .templates import chat_template


class InternVL2Dataset(InternVL_V1_5_Dataset):
    """InternVL2 instruction data (XTuner's JSON/JSONL format) for any InternVL2 chat template.

    Args:
        model_path: the InternVL2 checkpoint folder (its config and tokenizer are read).
        data_paths / image_folders / repeat_times: as in XTuner (one or a list); an image
            folder of None means "relative to the JSONL's folder".
        template: None (default) takes the chat format named by config.json's ``template``;
            a PROMPT_TEMPLATE-style dict overrides it (copied, never edited).
        system: system message; None uses the template's default (InternVL's own).
        dynamic_image_size: None follows config.json; False always gives one tile per image.
        max_length: longer samples are cut, as in XTuner.
    """

    def __init__(self, model_path, data_paths, image_folders=None, template=None, system=None,
                 dynamic_image_size=None, repeat_times=1, max_length=8192):
        self._init_format(model_path, template, system, dynamic_image_size, max_length)

        as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
        data_paths, image_folders, repeat_times = as_list(data_paths), as_list(image_folders), as_list(repeat_times)
        if len(image_folders) == 1 and len(data_paths) > 1:
            image_folders = image_folders * len(data_paths)
        if len(repeat_times) == 1 and len(data_paths) > 1:
            repeat_times = repeat_times * len(data_paths)
        if not len(data_paths) == len(image_folders) == len(repeat_times):
            raise VITaskError("data_paths, image_folders and repeat_times must have the same length")

        self.data_paths = data_paths
        self.data, self.image_folder = [], []
        for path, folder, times in zip(data_paths, image_folders, repeat_times):
            records = self._read_records(path)
            records = records * int(times)
            self.data.extend(records)
            self.image_folder.extend([folder if folder is not None else os.path.dirname(os.path.abspath(path))]
                                     * len(records))
        self.group_length = self._token_lengths()
        self._max_refetch = 1000
        print_log(f"{type(self).__name__}: {len(self.data)} samples, chat template {self.cfg.template!r}, "
                  f"{self.patch_token} image tokens per tile", logger="current")

    def _init_format(self, model_path, template, system, dynamic_image_size, max_length):
        """The checkpoint's chat format, tokenizer and image tiling (everything but the records)."""
        self.cfg = load_internvl_config(model_path)
        self.template = chat_template(self.cfg.template) if template is None else ConfigDict(copy.deepcopy(template))
        self._system = system if system is not None else self.template.get("DEFAULT_SYSTEM", "")
        self.max_length = max_length

        if dynamic_image_size is None:
            dynamic_image_size = getattr(self.cfg, "dynamic_image_size", True)
        self.min_dynamic_patch = self.cfg.min_dynamic_patch
        self.max_dynamic_patch = self.cfg.max_dynamic_patch if dynamic_image_size else 1
        self.use_thumbnail = self.cfg.use_thumbnail
        self.downsample_ratio = self.cfg.downsample_ratio
        self.image_size = self.cfg.force_image_size or self.cfg.vision_config.image_size
        self.patch_token = int((self.image_size // self.cfg.vision_config.patch_size) ** 2
                               * self.downsample_ratio ** 2)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
        self.transformer = self._image_transform()

    @classmethod
    def format_only(cls, model_path, template=None, system=None, dynamic_image_size=False, max_length=8192):
        """The chat format and image preprocessing of ``model_path`` with no records (evaluation, chat)."""
        self = cls.__new__(cls)
        InternVL2Dataset._init_format(self, model_path, template, system, dynamic_image_size, max_length)
        self.data_paths, self.data, self.image_folder, self.group_length = [], [], [], []
        return self

    def _image_transform(self):
        # XTuner builds its transform inline in __init__; rebuild the same pipeline.
        import torchvision.transforms as T
        from torchvision.transforms.functional import InterpolationMode

        return T.Compose([
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((self.image_size, self.image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=self.IMAGENET_MEAN, std=self.IMAGENET_STD),
        ])

    @staticmethod
    def _read_records(path):
        if not os.path.isfile(path):
            raise VITaskError(f"data file {path} does not exist: run data_tools/medmnist_to_xtuner.py first")
        try:
            records = load_json_or_jsonl(str(path))
        except ValueError as err:
            raise VITaskError(f"{path} is not valid JSON/JSONL: {str(err).splitlines()[0]}") from None
        for n, record in enumerate(records):
            if "conversations" not in record:
                raise VITaskError(f"{path} record {n + 1} has no 'conversations' key (XTuner InternVL format)")
        return records

    def _token_lengths(self):
        """Text tokens + image tokens per sample (negative for text-only), for XTuner's LengthGroupedSampler."""
        texts = ["\n".join(turn["value"] for turn in r["conversations"]) for r in self.data]
        unique = sorted(set(texts))
        counts = dict(zip(unique, (len(ids) for ids in self.tokenizer(unique, add_special_tokens=False).input_ids)))
        tiles = self.max_dynamic_patch + (self.use_thumbnail and self.max_dynamic_patch > 1)
        return [counts[t] + tiles * self.patch_token if r.get("image") else -counts[t]
                for t, r in zip(texts, self.data)]

    def get_inputid_labels(self, conversations, image_token_str):
        # XTuner rewrites the "<image>" placeholder inside the stored record; give it a copy.
        return super().get_inputid_labels(copy.deepcopy(conversations), image_token_str)

    @property
    def modality_length(self):
        return self.group_length

    @property
    def length(self):
        return np.abs(np.asarray(self.group_length)).tolist()
