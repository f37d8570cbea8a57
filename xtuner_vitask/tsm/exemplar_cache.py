"""Exemplar cache: every image's TSM feature computed once, so VITask trains with no TSM forward.

A cache file (``torch.save`` of a plain dict, loadable with ``weights_only=True``) holds:
``ids`` (record ids, row order), ``features`` (float16, (N, D) for 'cls' or (N, T, D) for 'all'),
``feature_kind``, ``feature_dim``, ``num_tokens``, ``tsm_sha256`` (the TSM checkpoint's sha256),
``model_name``, ``img_size`` and ``format_version``. :meth:`ExemplarCache.load` refuses a cache made
by another TSM, for another feature kind, or lacking ids the data needs.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..contract import META_FILE, read_jsonl
from ..ep.exemplar_tsm import FEATURE_KINDS, tsm_transform
from ..errors import VITaskError
from .dataset import load_rgb_image
from .model import TaskSpecificModel

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def jsonl_files_of(sources: Iterable[str]) -> list[str]:
    """Expand data folders into their split JSONL files (train/val/test present); files pass through."""
    files = []
    for src in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        src = str(src)
        if os.path.isdir(src):
            found = [os.path.join(src, f"{s}.jsonl") for s in SPLITS if os.path.isfile(os.path.join(src, f"{s}.jsonl"))]
            if not found:
                raise VITaskError(f"{src} holds no train/val/test.jsonl: pass a folder written by data_tools")
            files.extend(found)
        elif os.path.isfile(src):
            files.append(src)
        else:
            raise VITaskError(f"data {src} does not exist: pass a data folder or a JSONL file")
    if not files:
        raise VITaskError("no data given: pass at least one data folder or JSONL file")
    return files


class _ImageRecords(Dataset):
    """(id, TSM pixels) of every record of some JSONL files, ids unique."""

    def __init__(self, jsonl_files: Sequence[str], transform):
        self.items, seen = [], {}
        for path in jsonl_files:
            folder = os.path.dirname(os.path.abspath(path))
            for rec in read_jsonl(path):
                if rec["id"] in seen:
                    if seen[rec["id"]] != path:
                        raise VITaskError(f"record id {rec['id']} appears in {seen[rec['id']]} and {path}: ids must "
                                          "be unique across the cached data")
                    raise VITaskError(f"record id {rec['id']} appears twice in {path}: ids must be unique")
                seen[rec["id"]] = path
                self.items.append((rec["id"], os.path.join(folder, rec["image"])))
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        record_id, path = self.items[index]
        return record_id, self.transform(load_rgb_image(path))


def _collate_ids_images(batch):
    return [b[0] for b in batch], torch.stack([b[1] for b in batch])


def build_exemplar_cache(tsm: TaskSpecificModel, sources, out_file: str, kind: str = "cls",
                         checksum: str | None = None, batch_size: int = 64, num_workers: int = 0,
                         progress: bool = True) -> dict:
    """Compute every record's exemplar with the frozen ``tsm`` and save the cache atomically.

    ``sources``: data folders (all their split JSONLs) or JSONL files. ``checksum`` defaults to the
    ``sha256`` that :func:`xtuner_vitask.tsm.load_tsm` attached. Returns a summary: n, seconds, images_per_s, shape.
    """
    if kind not in FEATURE_KINDS:
        raise VITaskError(f"feature kind {kind!r}: use 'cls' (EP_cls) or 'all' (EP_all)")
    checksum = checksum or getattr(tsm, "sha256", None)
    if not checksum:
        raise VITaskError("the exemplar cache needs the TSM checkpoint's sha256: load the TSM with load_tsm "
                          "or pass checksum=tsm_checksum(CKPT)")
    if batch_size < 1:
        raise VITaskError(f"batch_size must be at least 1, got {batch_size}")
    transform = tsm_transform(tsm.img_size, tsm.mean, tsm.std)
    records = _ImageRecords(jsonl_files_of(sources), transform)
    if not len(records):
        raise VITaskError("the given data has no records to cache")
    loader = DataLoader(records, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_ids_images)
    ids, chunks = [], []
    start = time.perf_counter()
    for batch_ids, images in tqdm(loader, desc=f"exemplars ({kind})", unit="batch", disable=not progress):
        chunks.append(tsm.extract_features(images, kind=kind).to("cpu", torch.float16))
        ids.extend(batch_ids)
    seconds = time.perf_counter() - start
    features = torch.cat(chunks)
    cache = {"format_version": FORMAT_VERSION, "ids": ids, "features": features, "feature_kind": kind,
             "feature_dim": int(features.shape[-1]),
             "num_tokens": int(features.shape[1]) if kind == "all" else 1,
             "tsm_sha256": checksum, "model_name": tsm.model_name, "img_size": tsm.img_size}
    out_file = str(out_file)
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    tmp = f"{out_file}.tmp{os.getpid()}"
    try:
        torch.save(cache, tmp)
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"n": len(ids), "seconds": seconds, "images_per_s": len(ids) / max(seconds, 1e-9),
            "shape": tuple(features.shape), "out_file": out_file}


def cache_exemplars(tsm_checkpoint: str, sources, out_file: str, kind: str = "cls", config=None,
                    device: str | None = None, batch_size: int = 64, num_workers: int = 0) -> dict:
    """``xtuner-vitask cache-exemplars``: load the TSM (a glob picks the newest checkpoint), refuse data
    folders of another label set, build the cache. Returns :func:`build_exemplar_cache`'s summary
    plus the TSM's ``tsm_sha256``."""
    from .checkpoint import check_tsm_matches_meta, load_tsm, resolve_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tsm = load_tsm(resolve_checkpoint(tsm_checkpoint), config=config, device=device)
    for src in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        src = str(src)  # a TSM of another data set would give meaningless exemplars
        folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        meta = os.path.join(folder, META_FILE)
        if os.path.isfile(meta):
            check_tsm_matches_meta(tsm, meta)
        elif os.path.isdir(src):
            raise VITaskError(f"{src} has no meta.json: pass a folder written by data_tools")
    summary = build_exemplar_cache(tsm, sources, out_file, kind=kind, batch_size=batch_size, num_workers=num_workers)
    return dict(summary, tsm_sha256=tsm.sha256)


class ExemplarCache:
    """Exemplars by record id: ``cache[id] -> (D,) / (T, D)``, ``cache[[ids]] -> (B, D) / (B, T, D)``."""

    def __init__(self, data: dict, path: str = "<memory>"):
        self.path = path
        self.ids = list(data["ids"])
        self.features = data["features"]
        self.kind = data["feature_kind"]
        self.feature_dim = int(data["feature_dim"])
        self.tsm_sha256 = data["tsm_sha256"]
        self._row = {record_id: i for i, record_id in enumerate(self.ids)}

    @classmethod
    def load(cls, path: str, expected_tsm_sha256: str | None = None, expected_kind: str | None = None,
             required_ids: Iterable[str] | None = None) -> "ExemplarCache":
        """Open a cache and refuse it when it belongs to another TSM, feature kind, or lacks ids."""
        if not os.path.isfile(path):
            raise VITaskError(f"exemplar cache {path} does not exist: build it with `xtuner-vitask cache-exemplars`")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VITaskError(f"{path} is not an exemplar cache ({type(e).__name__}): rebuild it with "
                              "`xtuner-vitask cache-exemplars`") from e
        needed = ("format_version", "ids", "features", "feature_kind", "feature_dim", "tsm_sha256")
        if not isinstance(data, dict) or any(k not in data for k in needed):
            raise VITaskError(f"{path} is not an exemplar cache (keys missing): rebuild it with "
                              "`xtuner-vitask cache-exemplars`")
        if data["format_version"] != FORMAT_VERSION:
            raise VITaskError(f"{path} has cache format {data['format_version']}, this version reads "
                              f"{FORMAT_VERSION}: rebuild it with `xtuner-vitask cache-exemplars`")
        if expected_tsm_sha256 is not None and data["tsm_sha256"] != expected_tsm_sha256:
            raise VITaskError(f"exemplar cache {path} was made by another TSM (sha256 {data['tsm_sha256'][:12]}..., "
                              f"expected {expected_tsm_sha256[:12]}...): rebuild it with this TSM")
        if expected_kind is not None and data["feature_kind"] != expected_kind:
            raise VITaskError(f"exemplar cache {path} holds '{data['feature_kind']}' features but '{expected_kind}' "
                              f"are needed: rebuild it with --kind {expected_kind}")
        cache = cls(data, path)
        if required_ids is not None:
            missing = [i for i in required_ids if i not in cache._row]
            if missing:
                raise VITaskError(f"exemplar cache {path} lacks {len(missing)} record ids (e.g. {missing[:3]}): "
                                  "rebuild it over all the data folders used")
        return cache

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, ids) -> torch.Tensor:
        if isinstance(ids, str):
            return self.features[self._rows([ids])[0]]
        return self.features[self._rows(list(ids))]

    def _rows(self, ids: list) -> list:
        try:
            return [self._row[i] for i in ids]
        except KeyError as e:
            raise VITaskError(f"record id {e.args[0]!r} is not in exemplar cache {self.path}: rebuild the cache "
                              "over this data") from None
