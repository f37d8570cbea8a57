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

    It also tells a dataset with ``set_negatives`` (VITaskDataset) whether the NEXT batch needs CRT
    negatives: XTuner's loop fetches a batch before ``before_train_iter`` runs, so the switch is made
    after the last stage-1 iteration (exact at an epoch boundary, the paper's switch, whatever the
    workers). A stage-2 batch that workers prepared earlier (a mid-epoch switch) gets its negatives
    in the main process before the step (logged).
    """

    priority = "HIGH"  # before the checkpoint hook (VERY_LOW) in after_train_iter

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
        self._connector_group(runner)  # fail at the start, not at the switch
        self._apply(runner, runner.iter)
        self._set_negatives(runner, runner.iter, check=self.switch_iter < runner.max_iters)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._apply(runner, runner.iter)
        self._complete_negatives(runner, data_batch)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = self._model(runner)
        if model.stage == 2:  # saved like any trained tensor; frozen again before the next step
            model.connector.requires_grad_(True)
        self._set_negatives(runner, runner.iter + 1)  # the loop fetches iteration iter+1's batch next

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

    # ---- CRT negatives: loaded for stage-2 batches only (datasets/vitask.py) ----------------------------
    def _set_negatives(self, runner, next_iter, check=False):
        dataset = getattr(runner.train_dataloader, "dataset", None)
        model = self._model(runner)
        if not hasattr(dataset, "set_negatives"):
            return
        crt = getattr(model, "use_crt", False)
        if check and crt and not dataset.negatives:  # say so now, not after stage 1
            dataset.set_negatives(True)
        dataset.set_negatives(next_iter >= self.switch_iter and crt)

    def _complete_negatives(self, runner, data_batch):
        model = self._model(runner)
        data = data_batch.get("data") if isinstance(data_batch, dict) else None
        if model.stage != 2 or not getattr(model, "use_crt", False) or data is None or "neg_image_index" in data:
            return
        dataset = getattr(runner.train_dataloader, "dataset", None)
        if not hasattr(dataset, "attach_negatives"):
            return
        collate = getattr(runner.train_dataloader, "collate_fn", None)
        dataset.attach_negatives(data, getattr(collate, "keywords", {}).get("negatives_from_batch", True))
        self._completed += 1
        if self._completed == 1:
            print_log(f"VITaskStageHook: the batch of iteration {runner.iter} was prepared before stage 2 "
                      "(a mid-epoch switch with DataLoader workers): its CRT negatives are loaded in the main "
                      "process; switch at an epoch boundary to load them in the workers", logger="current")
