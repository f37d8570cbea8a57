"""The task-specific model (TSM): model, checkpoints, dataset, metric and exemplar cache.

No XTuner import anywhere here: a TSM-only config (``configs/tsm_*.py``) or ``cache-exemplars``
loads mmengine, timm and torch only. Names resolve on first use.

- :mod:`.model`: ``TaskSpecificModel`` (a timm classifier as an mmengine model; joint mode over merged sets).
- :mod:`.checkpoint`: ``load_tsm`` (weights-only), ``resolve_checkpoint``, ``read_tsm_identity``,
  ``tsm_checksum``, ``check_tsm_matches_meta``.
- :mod:`.dataset`: ``ImageClassificationDataset`` and ``tsm_collate`` over the JSONL data contract.
- :mod:`.metric`: ``ClassificationMetric`` (mmengine's validation metric).
- :mod:`.exemplar_cache`: ``build_exemplar_cache``, ``ExemplarCache``.
"""
import importlib

_NAMES = {
    "TaskSpecificModel": "model",
    "load_tsm": "checkpoint", "resolve_checkpoint": "checkpoint", "read_tsm_identity": "checkpoint",
    "tsm_checksum": "checkpoint", "check_tsm_matches_meta": "checkpoint", "load_weights_only": "checkpoint",
    "ImageClassificationDataset": "dataset", "tsm_collate": "dataset", "build_tsm_transform": "dataset",
    "ClassificationMetric": "metric",
    "ExemplarCache": "exemplar_cache", "build_exemplar_cache": "exemplar_cache",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
