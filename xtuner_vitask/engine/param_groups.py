"""Optimizer parameter groups chosen by the model, for every engine.

mmengine builds the optimizer from ``model.parameters()`` alone, and XTuner's ``--deepspeed`` path keeps
only the config's ``optimizer`` dict (no ``constructor``, no ``paramwise_cfg``). So a model marks the
parameters that need a group of their own (``tag_param_group``), and the optimizer's ``type`` is
``optimizer_with_param_groups``, which sorts ``model.parameters()`` by those marks. DeepSpeed ZeRO keeps
the groups it is given (one flat fp32 partition per group) and reads each group's ``lr`` and
``weight_decay`` at every step.
"""
from torch.optim import AdamW

PARAM_GROUP_ATTR = "vitask_param_group"


def tag_param_group(module, name):
    """Put every parameter of ``module`` in the optimizer group ``name``."""
    for param in module.parameters():
        setattr(param, PARAM_GROUP_ATTR, name)


def optimizer_with_param_groups(params, optimizer_type=AdamW, lr_mult=None, **kwargs):
    """``optimizer_type(groups, **kwargs)``: untagged parameters in the first group, then one group per tag
    (``group['name']`` = the tag), so mmengine logs the first group's lr as usual. ``lr_mult``: {tag: factor}
    starts that group at ``factor x lr`` (LR schedulers then scale every group alike)."""
    groups = {None: []}
    for param in params:
        groups.setdefault(getattr(param, PARAM_GROUP_ATTR, None), []).append(param)
    lr_mult = lr_mult or {}
    return optimizer_type([dict(params=groups.pop(None))]
                          + [dict(params=ps, name=name, **({"lr": kwargs["lr"] * lr_mult[name]} if name in lr_mult
                                                            else {}))
                             for name, ps in groups.items()], **kwargs)


def find_param_group(optim_wrapper, name):
    """The optimizer group called ``name`` (through any mmengine or DeepSpeed wrapper), or None."""
    found = [g for g in optim_wrapper.param_groups if g.get("name") == name]
    return found[0] if len(found) == 1 else None
