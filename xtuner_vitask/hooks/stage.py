"""VITaskStageHook: switches VITask from stage 1 to stage 2 at a configured point."""
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import VITaskError


@HOOKS.register_module()
class VITaskStageHook(Hook):
    """Switch stage 1 -> 2 (connector frozen, CRT on) at ``switch_epoch`` or ``switch_iter``.

    The stage is derived from the runner's iteration before every step, never stored,
    so a run resumed in stage 2 is in stage 2 from its first step.
    """

    priority = "HIGH"

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
        self._apply(runner, runner.iter)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._apply(runner, runner.iter)

    def _apply(self, runner, iteration):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        stage = 2 if iteration >= self.switch_iter else 1
        if model.stage != stage:
            model.set_stage(stage)
            print_log(f"VITask stage {stage} from iteration {iteration}: connector "
                      f"{'frozen, CRT on' if stage == 2 else 'trainable'}", logger="current")
