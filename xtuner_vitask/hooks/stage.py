"""Stage 1 -> stage 2 of VITask, the same under every engine (one process, DDP, DeepSpeed ZeRO-1/2/3).

Stage 2 freezes the exemplar connector. ``requires_grad=False`` alone is enough for torch's optimizers
(a parameter without a gradient is skipped) but not for DeepSpeed: ZeRO builds its flat fp32 partitions
when the engine starts, gives a parameter without a gradient zeros, and steps AdamW over the whole
partition, so stage 1's momentum and the weight decay keep moving a "frozen" connector. Hence:

- the connector's parameters have an optimizer group of their own (``engine.param_groups``: every engine
  builds its optimizer through ``optimizer_with_param_groups``; DeepSpeed keeps the groups it is given);
- the hook pins that group's ``lr`` and ``weight_decay`` to 0 before every stage-2 step, after whatever
  the LR schedulers wrote, so AdamW's update of the connector is exactly zero under every engine.

And every checkpoint stays complete: XTuner saves DeepSpeed checkpoints with
``exclude_frozen_parameters=True`` (parameters with ``requires_grad=False`` are dropped, and mmengine
loads non-strictly), so the connector is ``requires_grad=False`` only while a stage-2 step runs (ZeRO-3
needs that: it feeds a requires-grad parameter that got no gradient its stale last gradient) and is
marked trainable again after each step, before the checkpoint and eval hooks run.
"""
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..engine.param_groups import find_param_group
from ..errors import VITaskError
from ..models.vitask import CONNECTOR_GROUP


@HOOKS.register_module()
class VITaskStageHook(Hook):
    """Switch stage 1 -> 2 (connector frozen, CRT on) at ``switch_epoch`` or ``switch_iter``.

    The stage is derived from the runner's iteration before every step, never stored,
    so a run resumed in stage 2 is in stage 2 from its first step.
    """

    priority = "HIGH"  # before the checkpoint hook (VERY_LOW) in after_train_iter

    def __init__(self, switch_epoch=None, switch_iter=None):
        if (switch_epoch is None) == (switch_iter is None):
            raise VITaskError("VITaskStageHook needs exactly one of switch_epoch=... or switch_iter=...")
        self.switch_epoch, self.switch_iter = switch_epoch, switch_iter

    def before_train(self, runner):
        if self.switch_epoch is not None:
            # XTuner's TrainLoop counts iterations even when the config says max_epochs.
            self.switch_iter = int(round(self.switch_epoch * len(runner.train_dataloader)))
        if self.switch_iter > runner.max_iters:
            print_log(f"VITaskStageHook: switch at iteration {self.switch_iter} is after the last one "
                      f"({runner.max_iters}); training stays in stage 1", logger="current", level=30)
        self._connector_group(runner)  # fail at the start, not at the switch
        self._apply(runner, runner.iter)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._apply(runner, runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = self._model(runner)
        if model.stage == 2:  # saved like any trained tensor; frozen again before the next step
            model.connector.requires_grad_(True)

    def _apply(self, runner, iteration):
        model = self._model(runner)
        stage = 2 if iteration >= self.switch_iter else 1
        if model.stage != stage:
            print_log(f"VITask stage {stage} from iteration {iteration}: connector "
                      f"{'frozen, CRT on' if stage == 2 else 'trainable'}", logger="current")
        model.set_stage(stage)
        if stage == 2:
            group = self._connector_group(runner)
            group["lr"] = 0.0
            if "weight_decay" in group:
                group["weight_decay"] = 0.0

    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    @staticmethod
    def _connector_group(runner):
        group = find_param_group(runner.optim_wrapper, CONNECTOR_GROUP)
        if group is None:
            raise VITaskError(
                "the optimizer has no 'connector' parameter group, so stage 2 cannot freeze the connector under "
                "DeepSpeed: set optim_wrapper.optimizer=dict(type=optimizer_with_param_groups, "
                "optimizer_type=AdamW, lr=..., ...) (xtuner_vitask.engine), as configs/vitask/ do")
        return group
