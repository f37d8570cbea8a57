"""VITaskEvalHook's bookkeeping (no model: the evaluation is stubbed): it runs after the checkpoint,
a failing evaluation leaves the iteration saved and names what failed, the best checkpoint is one
file or folder whose record lives in the message hub, and a resumed run cleans up after the old one."""
import os

import pytest
from mmengine.hooks import CheckpointHook
from mmengine.logging import MessageHub
from mmengine.registry import HOOKS

from test_evaluation import FakeRunner
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.hooks.eval import INFO_KEY, VITaskEvalHook


def test_registered_under_its_name_and_runs_after_the_checkpoint_hook():
    from mmengine.runner.priority import get_priority

    assert HOOKS.get("VITaskEvalHook") is VITaskEvalHook
    assert get_priority(VITaskEvalHook.priority) > get_priority(CheckpointHook.priority)  # larger = later


def make_hook(tmp_path, scores, iteration=0, folders=False, message_hub=None, interval=2):
    """A hook whose evaluation returns the next of ``scores`` (an Exception is raised), on a stand-in runner."""
    hook = VITaskEvalHook(interval=interval)
    hook.records, hook.data_file, hook.ep_modes = [{}] * 5, "val.jsonl", (False,)
    scores = iter(scores)

    def evaluate(runner):
        value = next(scores)
        if isinstance(value, Exception):
            hook._doing = "ranking val.jsonl without EP"
            raise value
        return {"accuracy_no_ep": value, "macro_f1_no_ep": value}

    hook.evaluate = evaluate
    runner = FakeRunner(None, None, tmp_path / "work", iteration=iteration, folders=folders, message_hub=message_hub)
    hook.best = dict(runner.message_hub.get_info(INFO_KEY) or {})
    return hook, runner


def step(hook, runner):
    """One training iteration as mmengine runs it: CheckpointHook (every 2 iterations here), then this hook."""
    if (runner.iter + 1) % 2 == 0:
        runner.save_checkpoint(runner.work_dir, f"iter_{runner.iter + 1}.pth")
    hook.after_train_iter(runner, 0)
    runner.iter += 1


def best_files(runner):
    return sorted(f for f in os.listdir(runner.work_dir) if f.startswith("best_"))


@pytest.mark.parametrize("folders", [False, True])
def test_one_best_checkpoint_whose_record_lives_in_the_message_hub(tmp_path, folders):
    hook, runner = make_hook(tmp_path, [0.5, 0.4, 0.7, 0.7], folders=folders)
    for _ in range(8):
        step(hook, runner)
    assert best_files(runner) == ["best_macro_f1_no_ep_iter_6.pth"]  # 0.7 at 6; 0.7 at 8 is not better
    assert os.path.isdir(os.path.join(runner.work_dir, best_files(runner)[0])) == folders
    info = runner.message_hub.get_info(INFO_KEY)
    assert info == dict(score=0.7, path=os.path.join(runner.work_dir, "best_macro_f1_no_ep_iter_6.pth"), iter=6,
                        last_eval=8)
    assert runner.message_hub.get_scalar("val/macro_f1_no_ep").current() == 0.7
    assert INFO_KEY in runner.message_hub.state_dict()["runtime_info"]  # saved with every checkpoint


def test_a_failing_evaluation_leaves_the_iteration_saved_and_names_what_failed(tmp_path):
    hook, runner = make_hook(tmp_path, [RuntimeError("CUDA out of memory")], interval=3)
    step(hook, runner), step(hook, runner)  # iteration 2: a checkpoint, no evaluation
    with pytest.raises(VITaskError, match=r"iteration 3: ranking val.jsonl without EP failed \(RuntimeError: CUDA out "
                                          r"of memory\); the training state of this iteration is saved \(.*iter_3.pth\)"):
        step(hook, runner)  # iteration 3: no CheckpointHook save here, so the hook saves it before raising
    assert runner.saved == ["iter_2.pth", "iter_3.pth"] and os.path.isfile(os.path.join(runner.work_dir, "iter_3.pth"))


def test_when_the_checkpoint_hook_saved_the_iteration_the_hook_does_not_save_again(tmp_path):
    hook, runner = make_hook(tmp_path, [ValueError("bad batch")])
    step(hook, runner)
    with pytest.raises(VITaskError, match=r"iteration 2: .*\(ValueError: bad batch\).*saved \(.*iter_2.pth\)"):
        step(hook, runner)
    assert runner.saved == ["iter_2.pth"]


def test_resume_keeps_the_best_record_and_removes_best_files_the_checkpoint_does_not_know(tmp_path):
    hook, runner = make_hook(tmp_path, [0.5, 0.6])
    for _ in range(2):
        step(hook, runner)
    state = runner.message_hub.state_dict()  # what iter_2.pth carries: best 0.5 at iteration 2
    for _ in range(2):
        step(hook, runner)  # iteration 4: 0.6 -> best_..._iter_4, best_..._iter_2 deleted; then the run dies
    assert best_files(runner) == ["best_macro_f1_no_ep_iter_4.pth"]

    hub = MessageHub("resumed")
    hub.load_state_dict(state)
    resumed, runner2 = make_hook(tmp_path, [0.55, 0.8], iteration=2, message_hub=hub)
    resumed._after_resume(runner2)  # what before_train does on a resumed run (the data part is stubbed here)
    assert resumed.best["score"] == 0.5 and best_files(runner2) == []  # iter_4's best is from the abandoned future
    for _ in range(2):
        step(resumed, runner2)  # iteration 4 again: 0.55 beats 0.5
    assert best_files(runner2) == ["best_macro_f1_no_ep_iter_4.pth"]
    assert runner2.message_hub.get_info(INFO_KEY)["score"] == 0.55


def test_a_resumed_run_redoes_the_evaluation_its_checkpoint_did_not_record(tmp_path):
    hook, runner = make_hook(tmp_path, [0.5])
    hub = runner.message_hub
    hub.update_info(INFO_KEY, dict(score=0.4, path=str(tmp_path / "old" / "best.pth"), iter=2, last_eval=2))
    runner.iter = 4  # resumed from iter_4.pth, saved before iteration 4's evaluation ran
    hook.best = dict(hub.get_info(INFO_KEY))
    hook._after_resume(runner)
    assert hub.get_info(INFO_KEY)["last_eval"] == 4 and best_files(runner) == ["best_macro_f1_no_ep_iter_4.pth"]


def test_best_key_must_be_a_logged_metric(tmp_path, tiny_model, derma_data):
    from xtuner_vitask.datasets.internvl import InternVL2Dataset

    dataset = InternVL2Dataset(tiny_model, os.path.join(derma_data, "train.jsonl"), dynamic_image_size=False)
    runner = FakeRunner(object(), dataset, tmp_path / "w")
    with pytest.raises(VITaskError, match=r"best_key='macro_f1_ep' is not a metric it logs \(accuracy_no_ep, "):
        VITaskEvalHook(best_key="macro_f1_ep").before_train(runner)  # a plain model logs no EP metrics
    with pytest.raises(VITaskError, match="interval=0"):
        VITaskEvalHook(interval=0)


def test_ep_is_evaluated_when_every_val_record_has_an_exemplar(tmp_path, tiny_model, derma_data):
    """A VITask model with an exemplar cache covering the val split logs EP metrics too; a cache without the val
    records (and no TSM) evaluates without EP only, and says why."""
    import logging

    import torch
    from mmengine.logging import MMLogger

    from test_evaluation import Exemplars, load_wrapper
    from xtuner_vitask.datasets.internvl import InternVL2Dataset

    class PartialCache(Exemplars):
        def __getitem__(self, ids):
            if any(i.startswith("dermamnist/val") for i in ids):
                raise VITaskError(f"record id {ids[0]!r} is not in exemplar cache x.pt: rebuild the cache")
            return super().__getitem__(ids)

    torch.manual_seed(0)
    model = load_wrapper(tiny_model, ep=True)
    dataset = InternVL2Dataset(tiny_model, os.path.join(derma_data, "train.jsonl"), dynamic_image_size=False)
    dataset.exemplars, dataset.tsm_transform = Exemplars(), None
    runner = FakeRunner(model, dataset, tmp_path / "a", iteration=1)
    hook = VITaskEvalHook(interval=2, max_samples=4, batch_size=4, best_key="macro_f1_ep")
    hook.before_train(runner)
    hook.after_train_iter(runner, 0)
    logged = {k for k in runner.message_hub.log_scalars}
    assert logged == {f"val/{m}_{ep}" for m in ("accuracy", "macro_f1") for ep in ("ep", "no_ep")}
    assert runner.saved == ["best_macro_f1_ep_iter_2.pth"]

    warnings = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    MMLogger.get_current_instance().addHandler(handler)
    try:
        dataset.exemplars = PartialCache()
        hook = VITaskEvalHook(interval=2, max_samples=4, batch_size=4)
        hook.before_train(FakeRunner(model, dataset, tmp_path / "b"))
    finally:
        MMLogger.get_current_instance().removeHandler(handler)
    assert hook.ep_modes == (False,)
    assert any("evaluating without EP only" in w and "is not in exemplar cache" in w for w in warnings)
