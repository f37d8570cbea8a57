"""Small mmengine extensions the configs use: the optimizer-wrapper switch for machines without a GPU,
and LR schedulers whose epoch fractions never round to zero iterations."""
from .optim import amp_optim_wrapper
from .schedulers import WholeIterCosineAnnealingLR, WholeIterLinearLR

__all__ = ["amp_optim_wrapper", "WholeIterLinearLR", "WholeIterCosineAnnealingLR"]
