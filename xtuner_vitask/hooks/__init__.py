from .stage import VITaskStageHook

__all__ = ["VITaskStageHook"]
