from .internvl import InternVL2Dataset
from .llava import VITaskLLaVADataset
from .templates import INTERNVL_TEMPLATES, chat_template
from .vitask import VITaskDataset, vitask_collate_fn

__all__ = ["InternVL2Dataset", "VITaskDataset", "VITaskLLaVADataset", "vitask_collate_fn", "INTERNVL_TEMPLATES",
           "chat_template"]
