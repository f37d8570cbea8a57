"""VITaskDataset and its collate function: XTuner's InternVL samples plus what
EP and CRT need -- the class label, the TSM's input (or a cached exemplar), and a
CRT negative image (same instruction, different response; label-aware, seeded).
"""
import os
from collections import defaultdict

import numpy as np
import torch
from xtuner.dataset.collate_fns import default_collate_fn

from ..contract import turns
from ..errors import VITaskError
from .internvl import InternVL2Dataset


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
        negatives: give each sample a CRT negative image (needed in stage 2 with CRT on).
        seed: the negatives' seed.
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
        self.seed, self.negatives = seed, negatives
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
        item["id"] = self.ids[index]
        item["class_label"] = record["label"]
        if self.exemplars is not None:
            item["exemplar"] = self.exemplars[[self.ids[index]]][0]
        else:
            item["tsm_pixel_values"] = self.tsm_transform(self._last_image)
        if self.negatives:
            neg = self.negative_index(index)
            item["instruction_key"] = self.instruction_key[index]
            item["response_key"] = self.response_key[index]
            item["neg_id"] = self.ids[neg]
            item["neg_pixel_values"] = self.transformer(self._image(neg)).unsqueeze(0)
        return item


def vitask_collate_fn(instances, **kwargs):
    """XTuner's collate plus ids, labels, exemplars / TSM pixels and CRT negatives.

    A sample's negative is taken from the batch when another sample there has the same
    instruction and a different response (its image is encoded anyway); only the
    others' dataset-drawn negatives are kept, once per distinct image, so the ViT encodes each
    image once. ``neg_image_index[i]`` indexes the concatenation [batch tiles, extra negatives].
    """
    batch = default_collate_fn(instances, **kwargs)
    data = batch["data"]
    data["ids"] = [inst["id"] for inst in instances]
    data["class_labels"] = [inst["class_label"] for inst in instances]
    if "exemplar" in instances[0]:
        data["exemplars"] = torch.stack([torch.as_tensor(inst["exemplar"]).float() for inst in instances])
    if "tsm_pixel_values" in instances[0]:
        data["tsm_pixel_values"] = torch.stack([inst["tsm_pixel_values"] for inst in instances])
    if "neg_pixel_values" in instances[0]:
        first_tile = np.cumsum([0] + [inst["pixel_values"].shape[0] for inst in instances[:-1]])
        n_tiles = first_tile[-1] + instances[-1]["pixel_values"].shape[0]
        neg_index, extra, extra_slot = [], [], {}
        for i, inst in enumerate(instances):
            partner = next((j for j, other in enumerate(instances)
                            if other["instruction_key"] == inst["instruction_key"]
                            and other["response_key"] != inst["response_key"]), None)
            if partner is not None:
                neg_index.append(int(first_tile[partner]))
            else:  # two samples may draw the same negative image: encode it once
                key = inst.get("neg_id", ("sample", i))
                if key not in extra_slot:
                    extra_slot[key] = len(extra)
                    extra.append(inst["neg_pixel_values"])
                neg_index.append(int(n_tiles + extra_slot[key]))
        data["neg_image_index"] = torch.tensor(neg_index)
        data["neg_pixel_values"] = torch.cat(extra) if extra else None
    return batch
