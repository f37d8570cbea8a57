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

    It also tells a dataset with ``set_negatives`` (VITaskDataset) whether the NEXT batch needs CRT
    negatives: XTuner's loop fetches a batch before ``before_train_iter`` runs, so the switch is made
    after the last stage-1 iteration (exact at an epoch boundary, the paper's switch, whatever the
    workers). A stage-2 batch that workers prepared earlier (a mid-epoch switch) gets its negatives
    in the main process before the step (logged).
    """

    priority = "HIGH"

    def __init__(self, switch_epoch=None, switch_iter=None):
        if (switch_epoch is None) == (switch_iter is None):
            raise VITaskError("VITaskStageHook needs exactly one of switch_epoch=... or switch_iter=...")
        self.switch_epoch, self.switch_iter = switch_epoch, switch_iter
        self._completed = 0  # stage-2 batches whose negatives the main process loaded

    def before_train(self, runner):
        if self.switch_epoch is not None:
            # XTuner's TrainLoop counts iterations even when the config says max_epochs.
            self.switch_iter = int(round(self.switch_epoch * len(runner.train_dataloader)))
        if self.switch_iter > runner.max_iters:
            print_log(f"VITaskStageHook: switch at iteration {self.switch_iter} is after the last one "
                      f"({runner.max_iters}); training stays in stage 1", logger="current", level=30)
        self._apply(runner, runner.iter)
        self._set_negatives(runner, runner.iter, check=self.switch_iter < runner.max_iters)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._apply(runner, runner.iter)
        self._complete_negatives(runner, data_batch)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._set_negatives(runner, runner.iter + 1)  # the loop fetches iteration iter+1's batch next

    def _apply(self, runner, iteration):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        stage = 2 if iteration >= self.switch_iter else 1
        if model.stage != stage:
            model.set_stage(stage)
            print_log(f"VITask stage {stage} from iteration {iteration}: connector "
                      f"{'frozen, CRT on' if stage == 2 else 'trainable'}", logger="current")

    # ---- CRT negatives: loaded for stage-2 batches only (datasets/vitask.py) ----------------------------
    def _set_negatives(self, runner, next_iter, check=False):
        dataset = getattr(runner.train_dataloader, "dataset", None)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not hasattr(dataset, "set_negatives"):
            return
        crt = getattr(model, "use_crt", False)
        if check and crt and not dataset.negatives:  # say so now, not after stage 1
            dataset.set_negatives(True)
        dataset.set_negatives(next_iter >= self.switch_iter and crt)

    def _complete_negatives(self, runner, data_batch):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        data = data_batch.get("data") if isinstance(data_batch, dict) else None
        if model.stage != 2 or not getattr(model, "use_crt", False) or data is None or "neg_image_index" in data:
            return
        dataset = getattr(runner.train_dataloader, "dataset", None)
        if not hasattr(dataset, "attach_negatives"):
            return
        dataset.attach_negatives(data)
        self._completed += 1
        if self._completed == 1:
            print_log(f"VITaskStageHook: the batch of iteration {runner.iter} was prepared before stage 2 "
                      "(a mid-epoch switch with DataLoader workers): its CRT negatives are loaded in the main "
                      "process; switch at an epoch boundary to load them in the workers", logger="current")
