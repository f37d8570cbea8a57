"""VITaskDataset and its collate function: XTuner's InternVL samples plus what
EP and CRT need -- the class label, the TSM's input (or a cached exemplar), and a
CRT negative image (same instruction, different response; label-aware, seeded).

Only what the step uses is decoded: a sample's CRT negative is a :class:`LazyNegative` that the
collate function decodes only when the batch holds no partner (a sample with the same instruction
and another response, whose image is encoded anyway), and in stage 1 (no CRT) samples carry no
negative at all. The dataset does not know the stage: ``VITaskStageHook`` switches the loading with
:meth:`VITaskDataset.set_negatives`, through a flag in shared memory that the DataLoader workers'
copies of the dataset read, and completes in the main process a stage-2 batch that workers
prepared before the switch (:meth:`VITaskDataset.attach_negatives`).
"""
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from xtuner.dataset.collate_fns import default_collate_fn

from ..contract import turns
from ..errors import VITaskError
from .internvl import InternVL2Dataset, _UnreadableImage

NEGATIVES = (True, False, "stage2")


@dataclass(frozen=True)
class LazyNegative:
    """A sample's own drawn CRT negative: the dataset index of the negative sample, decoded on demand."""

    index: int
    load: Callable[[int], torch.Tensor]  # the dataset's negative_pixel_values, in the process that collates

    def pixel_values(self):
        return self.load(self.index)


def batch_rng(seed, indices):
    """The random source of a batch's in-batch partners: a pure function of the seed and the batch's samples
    (the same whatever the worker count, a resume, or which process collates)."""
    return np.random.default_rng([int(seed), *(int(i) for i in indices)])


def tile_counts(pixel_values):
    """Tiles per sample of a collated ``pixel_values`` ((B, n, 3, H, W) tensor or a list of (n_i, 3, H, W))."""
    if isinstance(pixel_values, (list, tuple)):
        return [p.shape[0] if p.ndim == 4 else 1 for p in pixel_values]
    return [pixel_values.shape[1]] * pixel_values.shape[0] if pixel_values.ndim == 5 else [1] * len(pixel_values)


def pair_negatives(keys, tiles, negatives, rng, indices=None, from_batch=True):
    """Each sample's CRT negative (paper eqs. 5-6) as ``neg_image_index`` into [batch tiles, extra negatives].

    ``keys[i]`` = (instruction key, response key); ``tiles[i]`` = sample i's tile count;
    ``negatives[i]`` = its :class:`LazyNegative`. A sample with partners in the batch (same instruction,
    another response) takes one of them drawn uniformly by ``rng``; the others decode their own negative,
    each distinct image once.

    ``from_batch=False``: every sample keeps its own drawn negative (a function of the seed and its
    index; the batch's encoding of that image is reused when ``indices`` has it), so stage 2 trains the
    same however the batch is split, e.g. 1 process x 8 samples or 2 processes x 4.
    """
    first_tile = np.cumsum([0] + list(tiles[:-1]))
    n_tiles = int(sum(tiles))
    neg_index, extra, slot = [], [], {}
    position = {int(index): j for j, index in enumerate(indices)} if indices is not None else {}
    for i, (instruction, response) in enumerate(keys):
        if from_batch:
            eligible = [j for j, (ins, res) in enumerate(keys) if ins == instruction and res != response]
        else:
            eligible = [position[negatives[i].index]] if negatives[i].index in position else []
        if eligible:
            neg_index.append(int(first_tile[eligible[int(rng.integers(len(eligible)))]]))
            continue
        negative = negatives[i]
        if negative.index not in slot:  # two samples may draw the same negative image: decode it once
            slot[negative.index] = len(extra)
            extra.append(negative.pixel_values())
        neg_index.append(n_tiles + slot[negative.index])
    return {"neg_image_index": torch.tensor(neg_index, dtype=torch.long),
            "neg_pixel_values": torch.cat(extra) if extra else None}


class VITaskDataset(InternVL2Dataset):
    """InternVL2 samples for VITask training (paper sec. 4).

    Args (beyond ``InternVL2Dataset``; images are one tile each by default, as CRT
    pairs an image's tokens with another image's in the same sequence):
        tsm_checkpoint: the TSM checkpoint (a glob picks the newest match); the img_size/mean/std
            it records give the TSM's input preprocessing, exactly as it was trained (cfg-options
            included). Or pass tsm_img_size/tsm_mean/tsm_std directly.
        exemplar_cache: a file from ``xtuner-vitask cache-exemplars``; then samples carry
            their exemplar and the TSM never runs. ``exemplar_kind`` ('cls'|'all') and
            ``tsm_checkpoint`` (checked against the cache's checksum) guard against stale caches.
        negatives: give each sample a CRT negative image (needed in stage 2 with CRT on): True (every
            sample carries one, decoded by the collate only when its batch has no partner), "stage2"
            (the same, but none until ``VITaskStageHook`` switches to stage 2: the configs; a DataLoader's
            workers start before any hook runs) or False (no CRT).
        seed: the negatives' seed (the drawn negative of a sample and the in-batch partners of a batch).
    """

    require_label = True  # EP and CRT need every record's class
    require_image = True  # and its image (the TSM's input)

    def __init__(self, model_path, data_paths, image_folders=None, *, tsm_img_size=None,
                 tsm_mean=(0.5, 0.5, 0.5), tsm_std=(0.5, 0.5, 0.5), exemplar_cache=None, exemplar_kind="cls",
                 tsm_checkpoint=None, negatives=True, seed=0, dynamic_image_size=False, **kwargs):
        super().__init__(model_path, data_paths, image_folders, dynamic_image_size=dynamic_image_size, **kwargs)
        self.ids = [r.get("id", str(n)) for n, r in enumerate(self.data)]
        self.tsm_transform = None
        if tsm_checkpoint is not None:
            from ..tsm.checkpoint import read_tsm_identity, resolve_checkpoint

            tsm_checkpoint = resolve_checkpoint(tsm_checkpoint)
            identity = read_tsm_identity(tsm_checkpoint)
            tsm_img_size, tsm_mean, tsm_std = identity["img_size"], identity["mean"], identity["std"]
        if tsm_img_size is not None:
            from ..ep.exemplar_tsm import tsm_transform

            self.tsm_transform = tsm_transform(tsm_img_size, tsm_mean, tsm_std)
        self.exemplars = None
        if exemplar_cache is not None:
            from ..tsm.checkpoint import tsm_checksum
            from ..tsm.exemplar_cache import ExemplarCache

            self.exemplars = ExemplarCache.load(
                exemplar_cache, expected_kind=exemplar_kind, required_ids=self.ids,
                expected_tsm_sha256=tsm_checksum(tsm_checkpoint) if tsm_checkpoint else None)
            self.tsm_transform = None  # the cache replaces the TSM's input
        if self.tsm_transform is None and self.exemplars is None:
            raise VITaskError("VITaskDataset needs tsm_img_size=... (TSM in the loop) or exemplar_cache=... (cached)")
        if not any(negatives is value for value in NEGATIVES):
            raise VITaskError(f"negatives={negatives!r}: use True, 'stage2' (from VITaskStageHook's stage 2 on) "
                              "or False (no CRT)")
        self.seed, self.negatives = seed, bool(negatives)
        # whether samples carry their negative now; in shared memory, so that the DataLoader workers' copies
        # of the dataset (forked or spawned) see set_negatives() of the main process
        self._load_negatives = torch.tensor(negatives is True).share_memory_()
        if negatives:
            self._index_negatives()

    # ---- checks and indexing -------------------------------------------------------------
    def _index_negatives(self):
        """Group samples by instruction, then by response, so a negative is one lookup away."""
        by_instruction = defaultdict(lambda: defaultdict(list))
        instr_key, resp_key = {}, {}
        self.instruction_key, self.response_key = [], []
        for n, record in enumerate(self.data):
            human, gpt = turns(record)
            i = instr_key.setdefault(human, len(instr_key))
            r = resp_key.setdefault(gpt, len(resp_key))
            by_instruction[i][r].append(n)
            self.instruction_key.append(i)
            self.response_key.append(r)
        for i, responses in by_instruction.items():
            if len(responses) < 2:
                only = next(iter(responses.values()))
                raise VITaskError(
                    f"no CRT negative is possible: all {len(only)} samples with the instruction of {self.ids[only[0]]} "
                    "have the same response (one class); CRT needs two classes per instruction, or set negatives=False "
                    "and use_crt=False")
        self._by_instruction = {i: {r: np.asarray(v) for r, v in rs.items()} for i, rs in by_instruction.items()}

    def negative_index(self, index):
        """A sample with the same instruction and a different response: a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        groups = self._by_instruction[self.instruction_key[index]]
        others = [r for r in groups if r != self.response_key[index]]
        candidates = groups[others[rng.integers(len(others))]]
        return int(candidates[rng.integers(len(candidates))])

    # ---- what the step uses --------------------------------------------------------------------------
    @property
    def loads_negatives(self):
        return bool(self._load_negatives)

    def set_negatives(self, on):
        """Give samples their CRT negative from the next fetched sample on (all processes), or stop."""
        if on and not self.negatives:
            raise VITaskError("the model trains CRT in stage 2 but VITaskDataset has negatives=False: set "
                              "negatives='stage2' (or True), or use_crt=False in the model")
        self._load_negatives.fill_(bool(on))

    def negative_pixel_values(self, index):
        """(1, 3, H, W): sample ``index``'s image as a CRT negative (a tile like its own first one)."""
        try:
            return self.transformer(self._image(index)).unsqueeze(0)
        except _UnreadableImage as exc:
            path, line = self.lines[index] if index < len(self.lines) else ("?", "?")
            raise VITaskError(f"{path} line {line}: {exc} (it was readable when training started)") from None

    def attach_negatives(self, data, negatives_from_batch=True):
        """Give a collated batch that came without negatives (prepared before stage 2) its CRT negatives,
        exactly as the collate function would have: same partners, same drawn negatives."""
        indices = data["indices"]
        keys = [(self.instruction_key[i], self.response_key[i]) for i in indices]
        negatives = [LazyNegative(self.negative_index(i), self.negative_pixel_values) for i in indices]
        data.update(pair_negatives(keys, tile_counts(data["pixel_values"]), negatives, batch_rng(self.seed, indices),
                                   indices=indices, from_batch=negatives_from_batch))
        return data

    # ---- samples -------------------------------------------------------------------------------
    def _image(self, index):
        return self.get_image(os.path.join(self.image_folder[index], self.data[index]["image"]))

    def get_image(self, path):
        # XTuner's prepare_data decodes the sample's image; keep it so the TSM input needs no second decode
        self._last_image = super().get_image(path)
        return self._last_image

    def prepare_data(self, index):
        self._last_image = None  # never a previous sample's image
        item = super().prepare_data(index)
        if item is None:
            return None
        if self._last_image is None:
            raise VITaskError(f"sample {self.ids[index]} has no image: VITask needs one per record (the TSM's input)")
        record = self.data[index]
        item["index"] = index
        item["id"] = self.ids[index]
        item["class_label"] = record["label"]
        if self.exemplars is not None:
            item["exemplar"] = self.exemplars[[self.ids[index]]][0]
        else:
            item["tsm_pixel_values"] = self.tsm_transform(self._last_image)
        if self.negatives:
            item["instruction_key"] = self.instruction_key[index]
            item["response_key"] = self.response_key[index]
            if self.loads_negatives:  # not decoded here: the collate does, if the batch has no partner
                neg = self.negative_index(index)
                item["neg_id"] = self.ids[neg]
                item["negative"] = LazyNegative(neg, self.negative_pixel_values)
                item["negative_seed"] = self.seed
        return item


def vitask_collate_fn(instances, negatives_from_batch=True, **kwargs):
    """XTuner's collate plus ids, dataset indices, labels, exemplars / TSM pixels and CRT negatives.

    When the samples carry negatives (stage 2), a sample's negative is a partner drawn at random
    (seeded by the batch, :func:`batch_rng`) among the batch's samples with the same instruction and
    another response (its image is encoded anyway); only samples without one decode their own drawn
    negative, once per distinct image. ``neg_image_index[i]`` indexes the concatenation
    [batch tiles, ``neg_pixel_values``]. Without negatives (stage 1) the batch has neither key.

    ``negatives_from_batch=False``: every sample keeps its own drawn negative (see :func:`pair_negatives`).
    """
    batch = default_collate_fn(instances, **kwargs)
    data = batch["data"]
    data["ids"] = [inst["id"] for inst in instances]
    data["indices"] = [inst["index"] for inst in instances]
    data["class_labels"] = [inst["class_label"] for inst in instances]
    if "exemplar" in instances[0]:
        data["exemplars"] = torch.stack([torch.as_tensor(inst["exemplar"]).float() for inst in instances])
    if "tsm_pixel_values" in instances[0]:
        data["tsm_pixel_values"] = torch.stack([inst["tsm_pixel_values"] for inst in instances])
    # a batch that a worker prepared while the stage switched may be mixed: then none (the stage hook completes it)
    if all("negative" in inst for inst in instances):
        keys = [(inst["instruction_key"], inst["response_key"]) for inst in instances]
        tiles = [inst["pixel_values"].shape[0] if inst["pixel_values"].ndim == 4 else 1 for inst in instances]
        rng = batch_rng(instances[0]["negative_seed"], data["indices"])
        data.update(pair_negatives(keys, tiles, [inst["negative"] for inst in instances], rng,
                                   indices=data["indices"], from_batch=negatives_from_batch))
    return batch
