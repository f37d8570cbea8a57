"""XTuner's InternVL dataset for every InternVL2 chat format, with every record checked up front.

XTuner 0.2.0's ``InternVL_V1_5_Dataset.__init__`` raises for LLMs other than
InternLM2 and Phi3, edits the shared ``PROMPT_TEMPLATE`` dict in place and always
tiles images dynamically. This subclass replaces ``__init__`` (format from
the config's ``template``, a private copy of it, ``dynamic_image_size`` honoured)
and keeps XTuner's image tiling, tokenisation and label masking as they are.

Before the first training step every record is checked (:meth:`InternVL2Dataset.validate`):
JSON, one ``<image>``, the image exists and is readable, the label is in range for its task, and
the tokenized sample fits ``max_length`` with its image tokens and response whole. All bad
records are reported at once with their line numbers; XTuner would otherwise substitute random
samples for unreadable images, train on cut responses (loss NaN) or fail hours in.
"""
import copy
import io
import os
import sys

import numpy as np
from mmengine import print_log
from mmengine.config import ConfigDict
from transformers import AutoTokenizer
from xtuner.dataset import InternVL_V1_5_Dataset
from xtuner.dataset.internvl_dataset import total_image_token

from ..contract import iter_jsonl, load_meta, meta_beside, problems_report, record_image, record_problems
from ..data.images import probe_images, read_image
from ..errors import VITaskError, install_excepthook
from ..internvl_config import load_internvl_config
from .templates import chat_template

install_excepthook()  # XTuner's train tool: a bad data set is one "error:" message, not a traceback


class _UnreadableImage(BaseException):
    """Raised by ``get_image`` past XTuner's ``except Exception`` in ``prepare_data``, which would print
    ``Error:`` and silently train on a random other sample instead."""


def check_workers() -> int:
    """Processes for the image checks: half the CPUs this process may use, shared by the ranks of a node,
    1..8 (on a shared 2-core machine one process was faster than two: 6.4 s against 7.6 s for 100k PNGs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, cpus // 2 // max(1, ranks)))


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
        max_length: the longest sample in tokens; a record whose image tokens or response would be
            cut at it is reported by :meth:`validate` (XTuner would cut it silently).
        validate: check every record before training (see :meth:`validate`); False skips it.
    """

    #: what :meth:`validate` demands of every record beyond XTuner's format (VITaskDataset: both)
    require_label = False
    require_image = False

    def __init__(self, model_path, data_paths, image_folders=None, template=None, system=None,
                 dynamic_image_size=None, repeat_times=1, max_length=8192, validate=True):
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
        self.data, self.image_folder, self.lines = [], [], []
        reports = []
        for path, folder, times in zip(data_paths, image_folders, repeat_times):
            folder = folder if folder is not None else os.path.dirname(os.path.abspath(path))
            problems = []
            numbered = list(iter_jsonl(path, problems if validate else None))
            if not numbered and not problems:
                raise VITaskError(f"{path} has no records: convert a non-empty split with data_tools")
            records = [record for _, record in numbered]
            if validate:
                total = len(numbered) + len(problems)  # the lines that are not JSON objects count too
                problems += self.validate(path, folder, numbered)
                if problems:
                    reports.append(problems_report(path, problems, total))
                    continue
            self.data.extend(records * int(times))
            self.image_folder.extend([folder] * (len(records) * int(times)))
            self.lines.extend([(path, line) for line, _ in numbered] * int(times))
        if reports:
            raise VITaskError("\n".join(reports))
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
        self.data_paths, self.data, self.image_folder, self.lines, self.group_length = [], [], [], [], []
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

    # ---- up-front validation ---------------------------------------------------------------------------
    def validate(self, path, image_folder, numbered):
        """``[(line, problem)]`` for the records of one JSONL (``numbered``: ``(line, record)`` pairs).

        Checks every record: XTuner's format and one ``<image>`` (:func:`~xtuner_vitask.contract.record_problems`,
        labels in range for the record's task when a meta.json is beside the file), the image
        (exists; header and PNG checksums read on worker processes, no pixel decoding), and the
        token count as XTuner builds the sample: the image tokens and the whole response must fit
        ``max_length``.
        """
        meta_path = meta_beside(path)
        meta = load_meta(meta_path) if os.path.isfile(meta_path) else None
        found = {}
        for line, record in numbered:
            problems = record_problems(record, meta, require_label=self.require_label,
                                       require_image=self.require_image)
            if problems:
                found[line] = problems
        with_image = [(line, os.path.join(image_folder, record_image(record))) for line, record in numbered
                      if line not in found and record_image(record) is not None]
        rank0 = int(os.environ.get("RANK", "0") or 0) == 0
        probes = probe_images([p for _, p in with_image], workers=check_workers(),
                              progress=rank0 and len(with_image) >= 5000)
        sizes = {}
        for (line, image_path), probe in zip(with_image, probes):
            if isinstance(probe, str):
                found[line] = [f"{probe}: {image_path}"]
            else:
                sizes[line] = probe
        cache = {}
        for line, record in numbered:
            if line in found:
                continue
            problem = self._length_problem(record, sizes.get(line), cache)
            if problem:
                found[line] = [problem]
        return [(line, "; ".join(problems)) for line, problems in found.items()]

    def _tiles(self, size):
        """Tiles XTuner's ``dynamic_preprocess`` cuts an image of ``size`` into (thumbnail included)."""
        if self.max_dynamic_patch <= 1:
            return 1
        blocks = total_image_token(size, self.min_dynamic_patch, self.max_dynamic_patch, self.image_size, False)
        return blocks + int(bool(self.use_thumbnail) and blocks != 1)

    def _length_problem(self, record, size, cache):
        """Why XTuner would cut this record at ``max_length`` (None when it fits)."""
        if size is not None and size not in cache:
            cache[size] = self._tiles(size)
        n_image = cache[size] * self.patch_token if size is not None else 0
        key = (tuple((t["from"], t["value"]) for t in record["conversations"]), n_image > 0)
        if key not in cache:
            cache[key] = self._untruncated_length(record["conversations"], n_image > 0)
        text_total, image_end = cache[key]
        extra = max(n_image - 1, 0)  # the sample was tokenized with one <IMG_CONTEXT> per image
        total, image_end = text_total + extra, image_end + extra
        if total <= self.max_length:
            return None
        if image_end > self.max_length:
            return (f"{total} tokens with {n_image} image tokens, max_length={self.max_length} would cut the image "
                    f"tokens: raise max_length to at least {total} (or use fewer tiles)")
        return (f"{total} tokens, max_length={self.max_length} would cut the response: raise max_length to at "
                f"least {total}")

    def _untruncated_length(self, conversations, with_image):
        """(tokens, end of the image tokens) of a sample as XTuner tokenizes it, with one image token."""
        image = f"{self.IMG_START_TOKEN}{self.IMG_CONTEXT_TOKEN}{self.IMG_END_TOKEN}" if with_image else None
        if with_image and not self._context_token_is_single():
            raise VITaskError(f"the tokenizer splits {self.IMG_CONTEXT_TOKEN}: use the InternVL2 checkpoint's tokenizer")
        limit, self.max_length = self.max_length, sys.maxsize
        try:
            input_ids = self.get_inputid_labels(conversations, image)["input_ids"]
        finally:
            self.max_length = limit
        end_id = self.tokenizer.convert_tokens_to_ids(self.IMG_END_TOKEN)
        image_end = input_ids.index(end_id) + 1 if with_image and end_id in input_ids else 0
        return len(input_ids), image_end

    def _context_token_is_single(self):
        ids = self.tokenizer.encode(self.IMG_CONTEXT_TOKEN * 3, add_special_tokens=False)
        return len(ids) == 3

    # ---- samples -------------------------------------------------------------------------------------
    def get_image(self, path):
        """The one image reader (16-bit/float rescaled, see ``data.images``) instead of ``convert('RGB')``."""
        try:
            if "s3://" in path:
                from mmengine.fileio import get

                return read_image(io.BytesIO(get(path)), "RGB")
            return read_image(path, "RGB")
        except VITaskError as exc:
            raise _UnreadableImage(str(exc)) from None

    def __getitem__(self, index):
        try:
            item = self.prepare_data(index)
        except _UnreadableImage as exc:
            path, line = self.lines[index] if index < len(self.lines) else ("?", "?")
            raise VITaskError(f"{path} line {line}: {exc} (it was readable when training started)") from None
        if item is None:
            raise VITaskError(f"sample {index} could not be prepared")
        return item

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
