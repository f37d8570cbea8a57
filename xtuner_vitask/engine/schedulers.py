"""LR schedulers written in epochs that stay valid for any number of iterations per epoch.

mmengine turns ``begin``/``end`` given in epochs into iterations with ``int(epochs * iters_per_epoch)``:
a warmup of 0.03 x 2 epochs on a set with 9 iterations per epoch (BreastMNIST on 8 GPUs) becomes 0
iterations and the run dies at start ("end should be larger than begin"). These subclasses round up
instead, to at least 2 iterations for a non-zero fraction (``LinearLR`` reaches its end factor on the
iteration before its end, so a 1-iteration warmup would stay at its start factor for the whole run);
the warmup's end and the cosine's begin (the same number of epochs) land on the same iteration.
"""
import math

from mmengine.optim import CosineAnnealingLR, LinearLR
from mmengine.optim.scheduler.param_scheduler import INF
from mmengine.registry import PARAM_SCHEDULERS


class _WholeIterations:
    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, epoch_length=None, **kwargs):
        def whole(epochs):
            iters = max(2, math.ceil(epochs * epoch_length - 1e-9)) if epochs > 0 else 0
            # mmengine applies int(); hand it the count plus a half so float error cannot round it down
            return (iters + 0.5) / epoch_length

        if not epoch_length:  # mmengine's own error for a missing epoch length
            return super().build_iter_from_epoch(*args, begin=begin, end=end, epoch_length=epoch_length, **kwargs)
        return super().build_iter_from_epoch(*args, begin=whole(begin), end=end if end == INF else whole(end),
                                             epoch_length=epoch_length, **kwargs)


@PARAM_SCHEDULERS.register_module()
class WholeIterLinearLR(_WholeIterations, LinearLR):
    """mmengine's ``LinearLR``; epoch fractions round up to whole iterations (>= 2)."""


@PARAM_SCHEDULERS.register_module()
class WholeIterCosineAnnealingLR(_WholeIterations, CosineAnnealingLR):
    """mmengine's ``CosineAnnealingLR``; epoch fractions round up to whole iterations (>= 2)."""
