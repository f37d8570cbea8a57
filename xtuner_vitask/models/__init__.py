"""Models: the InternVL2 wrapper, VITask on top of it, the exemplar connector, losses."""
from .._compat import allow_training_state_loads

allow_training_state_loads()  # configs import this package before the runner resumes

from .connector import ExemplarConnector  # noqa: E402
from .internvl import InternVL2  # noqa: E402
from .vitask import VITaskInternVL  # noqa: E402

__all__ = ["InternVL2", "VITaskInternVL", "ExemplarConnector"]
