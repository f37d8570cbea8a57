"""Models: the InternVL2 and LLaVA wrappers, VITask on top of both, losses. (The TSM is in ``xtuner_vitask.tsm``,
exemplar prompting in ``xtuner_vitask.ep``.)

Exports resolve lazily: importing this package does not pay for XTuner and transformers.
"""
import importlib

from .._compat import allow_training_state_loads
from ..errors import install_excepthook

# install.sh's import hook already did this when mmengine loaded; without it (a plain pip install) this still
# covers mmengine's own resume, which runs after the model is built (not XTuner's earlier seed read), and
# pth_to_hf's refusals.
allow_training_state_loads()
install_excepthook()

_EXPORTS = {"InternVL2": ".internvl", "VITaskInternVL": ".vitask", "VITask": ".vitask", "LLaVA": ".llava",
            "VITaskLLaVA": ".llava"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
