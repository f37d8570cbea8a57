"""Fixes for the pinned torch / XTuner stack, kept in this one place.

1. torch>=2.6 loads checkpoints with ``weights_only=True``. mmengine's resume
   (``HistoryBuffer``, ``ConfigDict``, numpy scalars in the message hub) and
   DeepSpeed's checkpoint loader then fail with ``Unsupported global``. Those
   checkpoints are the user's own training state, so ``allow_training_state_loads``
   restores the pre-2.6 default for the training process
   (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is read at every ``torch.load``). It is
   called when a config imports ``xtuner_vitask.models``; a user who sets the
   variable keeps their value.

2. The CPU build of torch (the one CI and CPU users install) does not define
   ``torchvision::nms``; PyPI's torchvision then fails at import with
   ``operator torchvision::nms does not exist`` -- and transformers, peft and
   XTuner import torchvision. ``install_torchvision_cpu_fix`` declares the two
   op schemas right before torchvision is first imported. It is wired into the
   interpreter start by a ``.pth`` file that ``install.sh`` writes only for the
   CPU build; torchvision's C++ ops (nms) still raise, nothing here uses them.
"""
import importlib.abc
import os
import sys


def allow_training_state_loads():
    """Let mmengine/DeepSpeed resume their own checkpoints under torch>=2.6."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _declare_torchvision_ops():
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return  # GPU builds ship the ops torchvision needs
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_OP_SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:  # already defined (e.g. a torchvision built for CPU)
            pass
    _declare_torchvision_ops.library = lib  # keep the fragment alive


class _TorchvisionCpuFix(importlib.abc.MetaPathFinder):
    """Declares torchvision's op schemas the first time torchvision is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _declare_torchvision_ops()
        return None  # let the normal finders import it


def install_torchvision_cpu_fix():
    """Install the lazy fix (called from the ``.pth`` file; costs nothing until torchvision is imported)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionCpuFix) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionCpuFix())
