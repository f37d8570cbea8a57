"""``amp_optim_wrapper``: mixed precision where an accelerator runs, plain fp32 where none does."""
from mmengine.device import is_cuda_available, is_mlu_available, is_musa_available, is_npu_available
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


def has_accelerator():
    return is_cuda_available() or is_npu_available() or is_mlu_available() or is_musa_available()


@OPTIM_WRAPPERS.register_module()
def amp_optim_wrapper(dtype="bfloat16", loss_scale="dynamic", **kwargs):
    """mmengine's ``AmpOptimWrapper(dtype=...)`` on a GPU (or NPU/MLU/MUSA); on a CPU-only machine the plain
    ``OptimWrapper`` in fp32, because ``AmpOptimWrapper`` asserts an accelerator and ``--cfg-options`` can neither
    swap its type (``dtype`` is then unexpected) nor delete a key. The one switch between the GPU recipe and a
    CPU dry run; the choice is logged once."""
    if has_accelerator():
        return AmpOptimWrapper(dtype=dtype, loss_scale=loss_scale, **kwargs)
    print_log(f"no GPU: training in fp32 with OptimWrapper instead of AmpOptimWrapper(dtype={dtype!r})",
              logger="current")
    return OptimWrapper(**kwargs)
