"""Exemplar prompting (EP), implemented once: used by training and copied verbatim into EP exports.

- :mod:`.exemplar_prompting`: the connector, where the exemplar tokens go (spans) and the splice.
- :mod:`.exemplar_tsm`: the TSM side: exemplar features of a timm model, its one input
  preprocessing, and the frozen TSM saved/loaded in timm's own Hugging Face folder layout.
- :mod:`.exemplar_errors`: ``VITaskError``.

These modules import only torch, timm and PIL, and each other relatively: the export writes them
beside ``modeling_vitask.py``, which imports them as InternVL's remote code imports its own files.
Importing this package is cheap; the names below resolve on first use.
"""
import importlib

EXPORTED_MODULES = ("exemplar_errors", "exemplar_prompting", "exemplar_tsm")  # copied into EP exports

_NAMES = {
    "VITaskError": "exemplar_errors",
    "EP_MODES": "exemplar_prompting", "feature_kind": "exemplar_prompting", "ExemplarConnector": "exemplar_prompting",
    "exemplar_spans": "exemplar_prompting", "splice_exemplars": "exemplar_prompting",
    "FEATURE_KINDS": "exemplar_tsm", "tsm_features": "exemplar_tsm", "tsm_transform": "exemplar_tsm",
    "internvl_tiles_to_tsm": "exemplar_tsm", "ExemplarTSM": "exemplar_tsm",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
