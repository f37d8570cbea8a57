"""VITaskEvalHook: val accuracy and macro-F1 by likelihood ranking during training, with and without
EP, through the same :func:`~xtuner_vitask.evaluation.evaluate.evaluate_records` as ``xtuner-vitask eval``.

- Evaluation never costs training state: the hook runs after mmengine's CheckpointHook, so an
  iteration's checkpoint is on disk before its evaluation runs; if the evaluation fails anyway,
  the hook makes sure that iteration is saved and raises one error naming what failed.
- Distributed: every rank ranks its shard of the val records and the results are gathered (the
  metrics equal the single-process ones); every rank takes the same best-checkpoint decision (a
  save is collective under DeepSpeed) and only the main process deletes files.
- The best score and checkpoint live in ``runner.message_hub`` (runtime info ``vitask_eval``),
  so a resumed run knows them: it removes best checkpoints that the checkpoint it resumed from
  does not know of, re-runs an evaluation that checkpoint did not record, and deletes the old
  best file when it finds a better one. Best checkpoints may be folders (DeepSpeed ZeRO-3).
- A merged multi-task set is evaluated per task (``<task>/accuracy_ep`` ...) and the unweighted
  means over tasks are logged as ``accuracy_ep`` etc.
"""
import logging
import os
import os.path as osp
import re
import shutil

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import VITaskError

INFO_KEY = "vitask_eval"


def unwrap(model):
    """The project's model inside DDP / DeepSpeed wrappers."""
    return model.module if is_model_wrapper(model) else model


def remove_checkpoint(path):
    """Delete a checkpoint file or folder (DeepSpeed saves folders); a missing one is fine."""
    try:
        if osp.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


@HOOKS.register_module()
class VITaskEvalHook(Hook):
    """Every ``interval`` iterations (and at the end), rank the label names' likelihoods on the val
    split, with and without EP, log accuracy and macro-F1, and keep the best checkpoint.

    Args:
        data_file: val JSONL; None takes val.jsonl beside the (first) training JSONL.
        interval: iterations between evaluations.
        max_samples: evaluate on the first N val records (cheap during training); None = all.
        batch_size: records per ranking batch (per rank).
        best_key: the logged metric whose maximum is kept as ``best_<key>_iter_<N>.pth``.
        save_best: False logs the metrics only.
        strategy: ranking strategy, 'shared-prefix' (fast) or 'full-sequence' (the reference).
    """

    priority = "LOWEST"  # after CheckpointHook (VERY_LOW): the iteration is saved before it is evaluated

    def __init__(self, data_file=None, interval=500, max_samples=None, batch_size=8, best_key="macro_f1_no_ep",
                 save_best=True, strategy="shared-prefix"):
        from ..evaluation.ranking import STRATEGIES

        if int(interval) < 1:
            raise VITaskError(f"VITaskEvalHook interval={interval}: use a positive number of iterations")
        if strategy not in STRATEGIES:
            raise VITaskError(f"VITaskEvalHook strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
        self.data_file, self.interval, self.max_samples = data_file, int(interval), max_samples
        self.batch_size, self.best_key, self.save_best, self.strategy = batch_size, best_key, save_best, strategy
        self.best = {}

    # ---- setup ---------------------------------------------------------------------------------
    def before_train(self, runner):
        from ..contract import load_meta, meta_beside
        from ..evaluation.evaluate import read_records
        from ..evaluation.inputs import ModelInputs

        dataset = runner.train_dataloader.dataset
        paths = getattr(dataset, "data_paths", None)
        if not paths:
            raise VITaskError("VITaskEvalHook needs a dataset that records its data_paths (InternVL2Dataset)")
        self.data_file = self.data_file or osp.join(osp.dirname(osp.abspath(paths[0])), "val.jsonl")
        if not osp.isfile(self.data_file):
            raise VITaskError(f"VITaskEvalHook: val data {self.data_file} does not exist: set data_file=... in the "
                              "hook's config (or convert the data with a val split)")
        self.image_folder = osp.dirname(osp.abspath(self.data_file))
        self.meta = load_meta(meta_beside(self.data_file))
        self.records = read_records(self.data_file, self.meta, self.max_samples)
        self.train_records = list(dataset.data)
        self.inputs = ModelInputs(dataset, tsm_transform=getattr(dataset, "tsm_transform", None))
        self.exemplars = getattr(dataset, "exemplars", None)
        self.ep_modes = (False, True) if self._can_rank_with_ep(unwrap(runner.model)) else (False,)
        keys = {f"{m}_{'ep' if ep else 'no_ep'}" for m in ("accuracy", "macro_f1") for ep in self.ep_modes}
        if self.meta.multi_task:
            keys |= {f"{t}/{k}" for t in self.meta.tasks for k in set(keys)}
        if self.save_best and self.best_key not in keys:
            raise VITaskError(f"VITaskEvalHook best_key={self.best_key!r} is not a metric it logs ({', '.join(sorted(keys))}): "
                              "set best_key to one of them, or save_best=False")
        self.best = dict(runner.message_hub.get_info(INFO_KEY) or {})
        if runner.iter > 0:
            self._after_resume(runner)

    def _can_rank_with_ep(self, model):
        """EP needs the VITask model and, for every val record, a cached exemplar or the TSM and its preprocessing."""
        if not hasattr(model, "exemplar_tokens"):
            return False
        reason = "the dataset gives no TSM preprocessing"
        if self.exemplars is not None:
            try:
                self.exemplars[[r["id"] for r in self.records]]
                return True
            except VITaskError as err:
                reason = f"{err}"
                self.exemplars = None
        if getattr(model, "tsm", None) is not None and self.inputs.tsm_transform is not None:
            return True
        print_log(f"VITaskEvalHook: evaluating without EP only ({reason})", logger="current", level=logging.WARNING)
        return False

    def _after_resume(self, runner):
        """Best checkpoints this run's state does not know of are gone; a missed evaluation is redone."""
        known = self.best.get("path")
        pattern = re.compile(rf"best_{re.escape(self.best_key)}_iter_\d+\.pth$")
        if is_main_process() and osp.isdir(runner.work_dir):
            for name in sorted(os.listdir(runner.work_dir)):
                path = osp.join(runner.work_dir, name)
                if pattern.fullmatch(name) and (known is None or osp.abspath(path) != osp.abspath(known)):
                    remove_checkpoint(path)
                    print_log(f"VITaskEvalHook: removed {path}: written after the checkpoint this run resumed from",
                              logger="current")
        if runner.iter % self.interval == 0 and self.best.get("last_eval", 0) < runner.iter:
            self._evaluate(runner, runner.iter)

    # ---- evaluation ------------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            self._evaluate(runner, runner.iter + 1)

    def evaluate(self, runner):
        """{metric: value} of the current model on the val records (every rank gets the same)."""
        from ..evaluation.evaluate import evaluate_records, mean_over_tasks

        model = unwrap(runner.model)
        results = {}
        for use_ep in self.ep_modes:
            self._doing = f"ranking {self.data_file} {'with' if use_ep else 'without'} EP"
            out = evaluate_records(model, self.inputs, self.records, self.meta, self.image_folder, mode="rank",
                                   use_ep=use_ep, batch_size=self.batch_size, strategy=self.strategy,
                                   train_records=self.train_records, exemplars=self.exemplars if use_ep else None,
                                   progress=False, distributed=True)
            suffix = "ep" if use_ep else "no_ep"
            if self.meta.multi_task:
                for task, rep in out["tasks"].items():
                    for key in ("accuracy", "macro_f1"):
                        results[f"{task}/{key}_{suffix}"] = rep["metrics"][key]
            for key in ("accuracy", "macro_f1"):
                results[f"{key}_{suffix}"] = mean_over_tasks(out["tasks"], key)
        return results

    def _evaluate(self, runner, iteration):
        self._doing = "preparing"
        try:
            results = self.evaluate(runner)
        except Exception as err:
            saved = self._make_sure_saved(runner, iteration)
            raise VITaskError(f"VITaskEvalHook at iteration {iteration}: {self._doing} failed ({type(err).__name__}: "
                              f"{err}); the training state of this iteration is saved ({saved}): fix the cause and "
                              "resume (resume=True), or remove the hook") from err
        for key, value in results.items():
            runner.message_hub.update_scalar(f"val/{key}", value)
        if runner.visualizer is not None:
            runner.visualizer.add_scalars({f"val/{k}": v for k, v in results.items()}, step=iteration)
        print_log(f"VITaskEvalHook iter {iteration} on {len(self.records)} val samples: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in results.items()), logger="current")
        self._keep_best(runner, iteration, results)

    def _make_sure_saved(self, runner, iteration):
        last = runner.message_hub.get_info("last_ckpt")
        if last and re.search(rf"iter_{iteration}(\.pth)?/?$", str(last)):
            return last
        name = f"iter_{iteration}.pth"
        try:
            runner.save_checkpoint(runner.work_dir, name, by_epoch=False)
        except Exception as err:  # noqa: BLE001 -- report the evaluation error, with this one
            return f"NOT saved: saving {name} failed too ({type(err).__name__}: {err})"
        return osp.join(runner.work_dir, name)

    def _keep_best(self, runner, iteration, results):
        score = results.get(self.best_key)
        improved = self.save_best and score is not None and score > self.best.get("score", float("-inf"))
        old = self.best.get("path")
        if improved:
            name = f"best_{self.best_key}_iter_{iteration}.pth"
            self.best = dict(score=float(score), path=osp.join(runner.work_dir, name), iter=iteration)
        self.best["last_eval"] = iteration
        # recorded before the best checkpoint is saved: that checkpoint carries its own record
        runner.message_hub.update_info(INFO_KEY, dict(self.best), resumed=True)
        if not improved:
            return
        runner.save_checkpoint(runner.work_dir, osp.basename(self.best["path"]), save_optimizer=False,
                               save_param_scheduler=False, by_epoch=False)  # every rank: collective under DeepSpeed
        print_log(f"VITaskEvalHook: best {self.best_key}={score:.4f} at iteration {iteration}: {self.best['path']}",
                  logger="current")
        if old and osp.abspath(old) != osp.abspath(self.best["path"]) and is_main_process():
            remove_checkpoint(old)
