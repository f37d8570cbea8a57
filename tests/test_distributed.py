"""Scale-out (issue 11): stage 2 freezes the connector under every engine, every checkpoint is complete,
and 1 process, 2-process DDP and DeepSpeed ZeRO-2/3 (gloo on CPU) train the same model.

The fast tests pin the mechanism on a toy model; the slow ones run XTuner's train tool under torchrun
(tests/dist_harness.py) on the tiny InternVL2, 12 iterations with the switch at 6, 4 samples per process.
"""
import glob
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import CosineAnnealingLR, OptimWrapper
from torch import nn

from conftest import REPO, run_train, vitask_options
from dist_harness import relabel, run_train_dist
from xtuner_vitask.engine.param_groups import find_param_group, optimizer_with_param_groups, tag_param_group
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.hooks import VITaskStageHook
from xtuner_vitask.models.vitask import CONNECTOR_GROUP


# ------------------------------------------------------------------------------------ the mechanism
class Toy(nn.Module):
    """What the stage hook touches on VITaskInternVL: ``stage``, ``set_stage`` and ``connector``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.connector = nn.Linear(4, 4), nn.Linear(4, 4)
        tag_param_group(self.connector, CONNECTOR_GROUP)
        self.stage = 1

    def set_stage(self, stage):
        self.stage = stage
        self.connector.requires_grad_(stage == 1)

    def loss(self, x):
        hidden = self.body(x)
        return (hidden + (self.connector(x) if self.stage == 1 else self.connector(x).detach())).square().mean()


def toy_run(pin, iters=8, switch=4, zero_grads=True):
    """Train the toy like XTuner's loop does; ``zero_grads`` gives a parameter without a gradient zeros at
    the step, as DeepSpeed's flat partitions do. Returns the connector's weights after every iteration."""
    model = Toy()
    optim = OptimWrapper(optimizer_with_param_groups(model.parameters(), lr=0.1, weight_decay=0.5))
    scheduler = CosineAnnealingLR(optim, T_max=iters, eta_min=0.05, by_epoch=False)
    runner = SimpleNamespace(model=model, optim_wrapper=optim, iter=0, max_iters=iters, train_dataloader=[0] * iters)
    hook = VITaskStageHook(switch_iter=switch)
    hook.before_train(runner)
    x, history = torch.randn(16, 4), []
    for it in range(iters):
        runner.iter = it
        if pin:
            hook.before_train_iter(runner, it)
        else:
            model.set_stage(2 if it >= switch else 1)
        loss = model.loss(x)
        loss.backward()
        if zero_grads:
            for p in model.connector.parameters():
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        optim.step()
        optim.zero_grad()
        hook.after_train_iter(runner, it)
        scheduler.step()  # after the step, as mmengine's ParamSchedulerHook: it writes every group's lr
        history.append(model.connector.weight.detach().clone())
    return history, model


def test_optimizer_with_param_groups_gives_tagged_parameters_a_named_group():
    model = Toy()
    optimizer = optimizer_with_param_groups(model.parameters(), lr=1e-3, weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    rest, connector = optimizer.param_groups
    assert "name" not in rest and connector["name"] == CONNECTOR_GROUP
    assert [id(p) for p in connector["params"]] == [id(p) for p in model.connector.parameters()]
    assert [id(p) for p in rest["params"]] == [id(p) for p in model.body.parameters()]
    assert connector["lr"] == rest["lr"] == 1e-3 and connector["weight_decay"] == 0.1


def test_zero_gradient_steps_move_a_frozen_parameter_unless_its_group_is_pinned():
    unpinned, _ = toy_run(pin=False)  # requires_grad=False alone, under DeepSpeed's zero gradients
    assert not torch.equal(unpinned[3], unpinned[-1])  # stage 1's momentum and the weight decay move it
    pinned, _ = toy_run(pin=True)
    assert not torch.equal(pinned[0], pinned[3])  # trained in stage 1
    assert all(torch.equal(pinned[3], w) for w in pinned[4:])  # bit-identical from the switch to the end


def test_stage_hook_pins_the_group_after_any_scheduler_and_unfreezes_for_saving():
    model = Toy()
    optim = OptimWrapper(optimizer_with_param_groups(model.parameters(), lr=0.1, weight_decay=0.5))
    runner = SimpleNamespace(model=model, optim_wrapper=optim, iter=5, max_iters=8, train_dataloader=[0] * 8)
    hook = VITaskStageHook(switch_iter=4)
    hook.before_train(runner)  # resumed in stage 2
    group = find_param_group(optim, CONNECTOR_GROUP)
    assert model.stage == 2 and (group["lr"], group["weight_decay"]) == (0.0, 0.0)
    group.update(lr=0.05, weight_decay=0.5)  # what a scheduler writes after a step
    hook.before_train_iter(runner, 5)
    assert (group["lr"], group["weight_decay"]) == (0.0, 0.0)
    assert not any(p.requires_grad for p in model.connector.parameters())  # no gradient during the step
    hook.after_train_iter(runner, 5)
    assert all(p.requires_grad for p in model.connector.parameters())  # saved by XTuner's DeepSpeed save


def test_stage_hook_refuses_an_optimizer_without_the_connector_group():
    model = Toy()
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.1))
    runner = SimpleNamespace(model=model, optim_wrapper=optim, iter=0, max_iters=8, train_dataloader=[0] * 8)
    with pytest.raises(VITaskError, match="optimizer_with_param_groups"):
        VITaskStageHook(switch_iter=4).before_train(runner)


def test_drawn_negatives_do_not_depend_on_the_batch(tiny_model, derma_data):
    from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn

    ds = VITaskDataset(tiny_model, f"{derma_data}/train.jsonl", tsm_img_size=32, max_length=512)
    ds.set_negatives(True)  # stage 2 (the stage hook's switch)
    items = [ds[i] for i in range(8)]

    def negatives(batch):
        data = vitask_collate_fn(batch, negatives_from_batch=False)["data"]
        tiles = torch.cat([data["pixel_values"].flatten(0, 1) if data["pixel_values"].ndim == 5
                           else torch.cat(list(data["pixel_values"]))]
                          + ([data["neg_pixel_values"]] if data["neg_pixel_values"] is not None else []))
        return [tiles[i] for i in data["neg_image_index"].tolist()]

    whole = negatives(items)
    split = negatives(items[0::2]) + negatives(items[1::2])  # rank 0 and rank 1 of 2 processes
    by_id = dict(zip([it["id"] for it in items[0::2] + items[1::2]], split))
    for i, (item, image) in enumerate(zip(items, whole)):
        drawn = ds.negative_pixel_values(ds.negative_index(i))[0]  # the sample's own drawn negative
        assert torch.equal(image, drawn) and torch.equal(by_id[item["id"]], image)


# ------------------------------------------------------------------------------------ 2 processes
TRAIN_SAMPLES, ITERS, SWITCH, EVERY = 48, 12, 6, 2  # 6 iterations per epoch, 8 samples each; a checkpoint every 2
COMMON = ("optim_wrapper.optimizer.weight_decay=0.05",  # a connector moved by AdamW in stage 2 would show
          "train_dataloader.collate_fn.negatives_from_batch=False",  # CRT negatives independent of the split
          "custom_hooks.1.max_samples=11", "custom_hooks.1.save_best=False",  # one evaluation, at the end
          f"default_hooks.checkpoint.interval={EVERY}", "default_hooks.checkpoint.max_keep_ckpts=-1")
TWO_PROCESSES = ("train_dataloader.batch_size=4", "log_level=DEBUG")  # DEBUG: mmengine writes one log per rank
ENGINES = {"ddp": None, "zero2": "configs/deepspeed/zero2_cpu.json", "zero3": "configs/deepspeed/zero3_cpu.json"}
# Same model on every engine, as the relative norm of the difference ||a - b|| / ||a|| over the connector's
# tensors and over the LoRA tensors (measured: see the README); a different partition of the same
# gradient sums in another order, and AdamW magnifies that in elements whose gradient is near zero.
SAME_MODEL = 1e-5


def rows(work_dir, key="loss"):
    """Per-iteration rows that mmengine's LocalVisBackend wrote (rank 0's)."""
    (path,) = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    found = [json.loads(line) for line in open(path)]
    return {row.get("iter", row.get("step")): row for row in found if key in row}


def rank_log(work_dir, rank):
    (path,) = glob.glob(os.path.join(work_dir, "*", f"*rank{rank}.log"))
    return open(path).read()


def trained(checkpoint):
    """Connector and LoRA tensors of a checkpoint file, or of a DeepSpeed folder from its fp32 master partitions
    (DeepSpeed's zero_to_fp32; XTuner's guess_load_checkpoint would round them to fp16)."""
    if os.path.isdir(checkpoint):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(checkpoint), os.path.basename(checkpoint))
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("connector.") or "lora_" in k or "modules_to_save" in k}


def model_file(checkpoint):
    """The trained tensors as the checkpoint's model file holds them (what mmengine and DeepSpeed resume from)."""
    if os.path.isdir(checkpoint):
        state = torch.load(os.path.join(checkpoint, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)["module"]
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("connector.") or "lora_" in k or "modules_to_save" in k}


def part(state, name):
    return {k: v for k, v in state.items() if k.startswith("connector.") == (name == "connector")}


def relative_difference(a, b):
    assert sorted(a) == sorted(b)
    return math.sqrt(sum(float((a[k].float() - b[k].float()).square().sum()) for k in a)
                     / sum(float(a[k].float().square().sum()) for k in a))


@pytest.fixture(scope="module")
def letters_data(tmp_path_factory, derma_data):
    return relabel(derma_data, tmp_path_factory.mktemp("letters") / "data", names=list("abcdefg"),
                   train_samples=TRAIN_SAMPLES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, letters_data, tiny_tsm):
    """Work folders of the uninterrupted runs, each trained once on first use: 'single' (1 process, 8 samples
    per step) and 'ddp', 'zero2', 'zero3' (2 processes, 4 samples each)."""
    done = {}

    def get(engine):
        if engine not in done:
            work = tmp_path_factory.mktemp(engine)
            options = vitask_options(tiny_model, letters_data, tiny_tsm, *COMMON)
            if engine == "single":
                run_train("configs/vitask_tiny_cpu.py", work, *options)
            else:
                run_train_dist("configs/vitask_tiny_cpu.py", work, *options, *TWO_PROCESSES,
                               deepspeed=ENGINES[engine])
            done[engine] = work
        return done[engine]

    return get




@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_every_rank_switches_stage_at_the_same_iteration(runs, engine):
    work = runs(engine)
    for rank in (0, 1):
        log = rank_log(work, rank)
        assert log.count("VITask stage 2 from iteration") == 1, rank
        assert f"VITask stage 2 from iteration {SWITCH}:" in log, rank


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["single", "ddp", "zero2", "zero3"])
def test_connector_is_bit_identical_through_stage_2(runs, engine):
    work = runs(engine)
    before, switch, end = (trained(work / f"iter_{i}.pth") for i in (SWITCH - EVERY, SWITCH, ITERS))
    assert part(before, "connector") and any(not torch.equal(before[k], switch[k]) for k in part(before, "connector"))
    for key in part(switch, "connector"):  # DeepSpeed: its fp32 master partitions of both ranks
        assert torch.equal(switch[key], end[key]), key
    assert any(not torch.equal(switch[k], end[k]) for k in part(switch, "lora"))  # stage 2 trains the LoRA
    if engine != "zero3":  # ZeRO-3's model file holds partitioned placeholders; its weights are the partitions
        for key, value in part(model_file(work / f"iter_{ITERS}.pth"), "connector").items():
            assert torch.equal(value, switch[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["single", "ddp", "zero2", "zero3"])
def test_stage_2_checkpoints_are_complete(runs, engine):
    work = runs(engine)
    checkpoint = work / f"iter_{SWITCH + EVERY}.pth"
    state = trained(checkpoint)
    assert len(part(state, "connector")) == 6 and len(part(state, "lora")) > 0
    if engine != "zero3":  # what a resume loads into the model (ZeRO-3 restores it from the partitions)
        held = model_file(checkpoint)
        assert sorted(held) == sorted(state)
        assert all(torch.equal(held[k], state[k]) for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("engine, start, tolerance", [("ddp", SWITCH - EVERY, 0.0), ("zero2", SWITCH + EVERY, 1e-5)])
def test_resume_reproduces_the_uninterrupted_run(runs, tmp_path, tiny_model, letters_data, tiny_tsm,
                                                  engine, start, tolerance):
    work = runs(engine)
    proc = run_train_dist("configs/vitask_tiny_cpu.py", tmp_path,
                          *vitask_options(tiny_model, letters_data, tiny_tsm, *COMMON), *TWO_PROCESSES,
                          deepspeed=ENGINES[engine], resume=work / f"iter_{start}.pth")
    assert f"VITask stage 2 from iteration {max(start, SWITCH)}:" in proc.stdout + proc.stderr
    full, resumed = rows(work), rows(tmp_path)
    assert sorted(resumed) == list(range(start + 1, ITERS + 1))
    for it in resumed:
        for key in ("loss", "loss_van", "loss_ep", "loss_rda") + (("loss_crt",) if it > SWITCH else ()):
            assert resumed[it][key] == pytest.approx(full[it][key], rel=tolerance, abs=tolerance), (it, key)
    a, b = trained(work / f"iter_{ITERS}.pth"), trained(tmp_path / f"iter_{ITERS}.pth")
    for key in a:
        if tolerance == 0 or key.startswith("connector."):
            assert torch.equal(a[key], b[key]), key
    assert relative_difference(a, b) <= tolerance


@pytest.mark.slow
def test_every_engine_trains_the_same_model(runs):
    single = {it: trained(runs("single") / f"iter_{it}.pth") for it in (SWITCH, ITERS)}
    for engine in ENGINES:
        for it in (SWITCH, ITERS):
            other = trained(runs(engine) / f"iter_{it}.pth")
            for name in ("connector", "lora"):
                difference = relative_difference(part(single[it], name), part(other, name))
                print(f"{engine} vs 1 process, iteration {it}, {name}: {difference:.1e}")  # pytest -s shows them
                assert difference < SAME_MODEL, (engine, it, name, difference)
    ddp = rows(runs("ddp"))  # rank 0's losses on the same 4 samples per step
    for engine in ("zero2", "zero3"):
        other = rows(runs(engine))
        print(f"{engine} vs ddp, rank-0 losses: {max(abs(other[i]['loss'] / ddp[i]['loss'] - 1) for i in ddp):.1e}")
        for it in ddp:
            assert other[it]["loss"] == pytest.approx(ddp[it]["loss"], rel=1e-5), (engine, it)


@pytest.mark.slow
def test_eval_metrics_equal_the_1_process_run(runs):
    reference = rows(runs("single"), key="val/accuracy_no_ep")
    assert list(reference) == [ITERS]
    for engine in ENGINES:
        metrics = rows(runs(engine), key="val/accuracy_no_ep")
        assert metrics.keys() == reference.keys(), engine
        for key, value in reference[ITERS].items():
            if key.startswith("val/"):
                assert metrics[ITERS][key] == pytest.approx(value, abs=1e-6), (engine, key)


@pytest.mark.slow
def test_pth_to_hf_exports_a_deepspeed_stage_2_folder(runs, tmp_path, tiny_model, letters_data, tiny_tsm):
    from safetensors.torch import load_file

    checkpoint = runs("zero2") / f"iter_{SWITCH + EVERY}.pth"
    cmd = [sys.executable, "-m", "xtuner.tools.model_converters.pth_to_hf", str(REPO / "configs/vitask_tiny_cpu.py"),
           str(checkpoint), str(tmp_path / "hf"), "--cfg-options", "model.llm=None",
           *vitask_options(tiny_model, letters_data, tiny_tsm)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = {}
    for shard in glob.glob(str(tmp_path / "hf" / "*.safetensors")):
        exported.update(load_file(shard))
    # XTuner reads a DeepSpeed folder in fp16 (xtuner.utils.zero_to_any_dtype's default): the connector
    # comes out as its fp32 master weights rounded to fp16 (README: zero_to_fp32.py for exact fp32 exports)
    for key, value in part(trained(checkpoint), "connector").items():
        assert torch.equal(exported[key], value.half().to(exported[key].dtype)), key
