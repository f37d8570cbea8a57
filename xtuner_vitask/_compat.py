"""Fixes for the pinned torch / XTuner stack, kept in this one place.

1. torch>=2.6 loads checkpoints with ``weights_only=True``: tensors and plain containers only.
   mmengine's resume (``HistoryBuffer`` and numpy scalars in the message hub) and XTuner's train
   tool, which reads the seed of a ``--resume`` checkpoint with a plain ``torch.load``, then fail
   with ``Unsupported global``. :func:`allow_training_state_loads` adds exactly the data types
   those checkpoints hold (:func:`training_state_globals`) to torch's weights-only allowlist;
   every load stays weights-only, so a checkpoint carrying any other pickled object (code) is
   still refused. It must run before XTuner's train tool reads the seed, i.e. before the config
   (and so this package) is loaded: an import hook runs it right after mmengine is first imported.
   DeepSpeed and XTuner's own model loader pass ``weights_only=False`` themselves.

2. XTuner's tools (train, pth_to_hf) let exceptions end the process with a traceback. A
   ``VITaskError`` is a user's mistake with its fix in the message: ``errors.install_excepthook``
   prints it as one ``error: ...`` line (``VITASK_TRACEBACK=1`` shows the traceback); other
   exceptions keep Python's usual report. Installed with the hook of 1, so that pth_to_hf's
   refusals, raised before any dataset is imported, are one line too.

3. The CPU build of torch (the one CI and CPU users install) does not define
   ``torchvision::nms``; PyPI's torchvision then fails at import with
   ``operator torchvision::nms does not exist`` -- and transformers, peft and
   XTuner import torchvision. An import hook declares the two op schemas right
   before torchvision is first imported (only on CPU builds of torch);
   torchvision's C++ ops (nms) still raise, nothing here uses them.

The hooks are installed at interpreter start by the ``.pth`` file that
``install.sh`` writes (``install_import_hooks``); they cost nothing until
torchvision or mmengine is imported.
"""
import importlib.abc
import importlib.util
import sys


def training_state_globals():
    """The non-tensor types of mmengine training checkpoints: the message hub's ``HistoryBuffer``
    (whose statistics methods mmengine pickles by name, through ``getattr``), numpy arrays, scalars
    and dtypes, and the ``ConfigDict`` of DeepSpeed's model-states file (XTuner reads the seed there).

    Measured on this stack's checkpoints (TSM, VITask, VITask under DeepSpeed ZeRO-2) with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``; the slow tests check the list still
    covers them. The weights-only unpickler calls only these; ``getattr`` can only read attributes of
    objects they built.
    """
    import numpy as np
    from mmengine.config import ConfigDict
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    # numpy >= 2 builds a dtype as an instance of its own class (numpy.dtypes.Float64DType, ...)
    dtype_classes = [type(np.dtype(name)) for name in ("bool", "int8", "int16", "int32", "int64", "uint8",
                                                        "float16", "float32", "float64")]
    return [HistoryBuffer, ConfigDict, getattr, np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct,
            *dtype_classes]


def allow_training_state_loads():
    """Let weights-only loads (torch>=2.6's default) read mmengine's training state: resume works."""
    import torch

    torch.serialization.add_safe_globals(training_state_globals())


def _on_mmengine_import():
    from .errors import install_excepthook

    allow_training_state_loads()
    install_excepthook()


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


class _ImportHook(importlib.abc.MetaPathFinder):
    """Runs ``action`` once around the first import of module ``name``: before it (``after=False``)
    or right after the module has executed (``after=True``)."""

    def __init__(self, name, action, after=False):
        self.name, self.action, self.after = name, action, after

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        if not self.after:
            self.action()
            return None  # let the normal finders import it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            loader_exec, action = spec.loader.exec_module, self.action

            def exec_module(module):
                loader_exec(module)
                action()

            spec.loader.exec_module = exec_module
        return spec


def install_import_hooks():
    """Called from the ``.pth`` file that install.sh writes."""
    hooks = {"torchvision": (_declare_torchvision_ops, False), "mmengine": (_on_mmengine_import, True)}
    installed = {f.name for f in sys.meta_path if isinstance(f, _ImportHook)}
    for name, (action, after) in hooks.items():
        if name in sys.modules:
            action()
        elif name not in installed:
            sys.meta_path.insert(0, _ImportHook(name, action, after))
