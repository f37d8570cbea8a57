"""Fixes for the pinned torch / XTuner stack, kept in this one place.

1. torch>=2.6 loads checkpoints with ``weights_only=True``. mmengine's resume
   (``HistoryBuffer``, ``ConfigDict``, numpy scalars in the message hub) and
   DeepSpeed's checkpoint loader then fail with ``Unsupported global``. Those
   checkpoints are the user's own training state, so ``allow_training_state_loads``
   restores the pre-2.6 default for processes that use mmengine
   (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is read at every ``torch.load``). It must
   run before XTuner's train tool reads the seed from a ``--resume`` checkpoint,
   i.e. before the config (and so this package) is loaded: an import hook runs it
   when mmengine is first imported. A user who sets the variable keeps their value.

2. The CPU build of torch (the one CI and CPU users install) does not define
   ``torchvision::nms``; PyPI's torchvision then fails at import with
   ``operator torchvision::nms does not exist`` -- and transformers, peft and
   XTuner import torchvision. An import hook declares the two op schemas right
   before torchvision is first imported (only on CPU builds of torch);
   torchvision's C++ ops (nms) still raise, nothing here uses them.

Both hooks are installed at interpreter start by the ``.pth`` file that
``install.sh`` writes (``install_import_hooks``); they cost nothing until
torchvision or mmengine is imported.
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


class _BeforeImport(importlib.abc.MetaPathFinder):
    """Runs ``action`` once, right before the module ``name`` is first imported."""

    def __init__(self, name, action):
        self.name, self.action = name, action

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            sys.meta_path.remove(self)
            self.action()
        return None  # let the normal finders import it


def install_import_hooks():
    """Called from the ``.pth`` file that install.sh writes."""
    hooks = {"torchvision": _declare_torchvision_ops, "mmengine": allow_training_state_loads}
    installed = {f.name for f in sys.meta_path if isinstance(f, _BeforeImport)}
    for name, action in hooks.items():
        if name in sys.modules:
            action()
        elif name not in installed:
            sys.meta_path.insert(0, _BeforeImport(name, action))
