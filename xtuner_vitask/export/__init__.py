"""Export of trained InternVL2 / VITask wrappers to Hugging Face folders, and loading them back.

- :func:`export_to_hf` is what ``model.to_hf(...)`` (and so ``xtuner convert pth_to_hf``) runs:
  LoRA merged by peft, the base checkpoint's remote code and tokenizer copied, and for VITask's
  EP variant the connector, the frozen TSM (``tsm/``) and ``modeling_vitask.py``.
- :mod:`.folder` checks an export folder (``xtuner_vitask.inference.exports`` loads it for eval and chat).
- :mod:`.plug` swaps a newly trained TSM into an EP export (VITask^plug).
"""
from .folder import ExportInfo, inspect_export, read_task_meta
from .to_hf import EP_FORMATS, PLAIN_FORMATS, export_to_hf

__all__ = ["export_to_hf", "inspect_export", "read_task_meta", "ExportInfo",
           "EP_FORMATS", "PLAIN_FORMATS"]
