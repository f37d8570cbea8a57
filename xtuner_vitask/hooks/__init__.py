from .eval import VITaskEvalHook
from .stage import VITaskStageHook

__all__ = ["VITaskStageHook", "VITaskEvalHook"]
