"""Models: the InternVL2 wrapper, VITask on top of it, the exemplar connector, the TSM, losses.

Exports resolve lazily: ``from xtuner_vitask.models.tsm import ...`` does not pay
for importing XTuner and transformers.
"""
import importlib

from .._compat import allow_training_state_loads

# install.sh's import hook already did this when mmengine loaded; without it (a plain pip install) this still
# covers mmengine's own resume, which runs after the model is built (not XTuner's earlier seed read).
allow_training_state_loads()

_EXPORTS = {
    "InternVL2": ".internvl", "VITaskInternVL": ".vitask", "ExemplarConnector": ".connector",
    "TaskSpecificModel": ".tsm", "load_tsm": ".tsm", "tsm_checksum": ".tsm", "check_tsm_matches_meta": ".tsm",
    "read_tsm_identity": ".tsm", "ExemplarCache": ".exemplar_cache", "build_exemplar_cache": ".exemplar_cache",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
