from .cls_eval import VITaskEvalHook
from .stage import VITaskStageHook, optimizer_with_connector_group

__all__ = ["VITaskStageHook", "VITaskEvalHook", "optimizer_with_connector_group"]
