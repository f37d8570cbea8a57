"""Small mmengine extensions the configs use: the optimizer-wrapper switch for machines without a GPU,
optimizer parameter groups chosen by the model, and LR schedulers whose epoch fractions never round to
zero iterations."""
from .optim import amp_optim_wrapper
from .param_groups import optimizer_with_param_groups
from .schedulers import WholeIterCosineAnnealingLR, WholeIterLinearLR

__all__ = ["amp_optim_wrapper", "optimizer_with_param_groups", "WholeIterLinearLR", "WholeIterCosineAnnealingLR"]
