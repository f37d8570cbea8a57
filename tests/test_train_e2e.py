"""End-to-end runs of XTuner's real train tool on the tiny models (CPU), configs as shipped (paths only through
--cfg-options): on InternVL2's InternLM2 code the vanilla recipe, VITask through both stages with its eval hook,
resume in stage 2, and training from an exemplar cache written by `xtuner-vitask cache-exemplars`; the vanilla
recipe on Phi3 and DeepSpeed ZeRO-3 on one process on Qwen2 (ZeRO-2/3 on 2 processes: test_distributed.py)."""
import glob
import json
import os

import pytest
import torch

from conftest import run_train, vitask_options

pytestmark = pytest.mark.slow


def scalars(work_dir):
    """Per-iteration training scalars that mmengine's LocalVisBackend wrote."""
    (path,) = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    rows = [json.loads(line) for line in open(path)]
    return {row["iter"]: row for row in rows if "loss" in row}


def test_vanilla_tiny_recipe_trains(tmp_path, tiny_model, derma_data):
    proc = run_train("configs/internvl2_tiny_cpu_lora.py", tmp_path, f"model.model_path={tiny_model}",
                     f"train_dataloader.dataset.model_path={tiny_model}",
                     f"train_dataloader.dataset.data_paths={derma_data}/train.jsonl", "train_cfg.max_epochs=2")
    assert "Iter(train) [24/24]" in proc.stdout + proc.stderr
    assert os.path.isfile(tmp_path / "iter_24.pth")


def test_vanilla_recipe_on_phi3_trains_and_evaluates(tmp_path, tiny_model_phi3, derma_data):
    """Phi3 (InternVL2-4B's LLM): fused qkv_proj/gate_up_proj LoRA targets, SDPA, DynamicCache ranking."""
    m = tiny_model_phi3
    proc = run_train("configs/internvl2_tiny_cpu_lora.py", tmp_path, f"model.model_path={m}",
                     f"train_dataloader.dataset.model_path={m}",
                     f"train_dataloader.dataset.data_paths={derma_data}/train.jsonl", "train_cfg.max_epochs=None",
                     "train_cfg.max_iters=3")
    log = proc.stdout + proc.stderr
    assert "Iter(train) [3/3]" in log and "VITaskEvalHook iter 3" in log
    assert os.path.isfile(tmp_path / "iter_3.pth")


@pytest.fixture(scope="module")
def vitask_run(tmp_path_factory, tiny_model, derma_data, tiny_tsm):
    work = tmp_path_factory.mktemp("vitask")
    proc = run_train("configs/vitask_tiny_cpu.py", work,
                     *vitask_options(tiny_model, derma_data, tiny_tsm, "default_hooks.checkpoint.interval=16",
                                    "default_hooks.checkpoint.max_keep_ckpts=3"))
    return work, proc.stdout + proc.stderr


def test_vitask_runs_both_stages_and_logs_every_term(vitask_run):
    work, log = vitask_run
    assert "VITask stage 2 from iteration 12" in log
    rows = scalars(work)
    assert sorted(rows) == list(range(1, 25))
    assert {"loss_van", "loss_ep", "loss_rda"} <= set(rows[1]) and "loss_crt" not in rows[12]
    assert {"loss_van", "loss_ep", "loss_rda", "loss_crt"} <= set(rows[13])
    assert "VITaskEvalHook iter 24" in log and "macro_f1_ep=" in log
    state = torch.load(work / "iter_24.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("connector.") for k in state) and not any(k.startswith("tsm.") for k in state)


def test_resume_in_stage2_reproduces_the_uninterrupted_losses(vitask_run, tmp_path, tiny_model, derma_data, tiny_tsm):
    work, _ = vitask_run
    proc = run_train("configs/vitask_tiny_cpu.py", tmp_path,
                     *vitask_options(tiny_model, derma_data, tiny_tsm), resume=work / "iter_16.pth")
    log = proc.stdout + proc.stderr
    assert "VITask stage 2 from iteration 16" in log  # resumed straight into stage 2
    full, resumed = scalars(work), scalars(tmp_path)
    assert sorted(resumed) == list(range(17, 25))
    for it in resumed:
        for key in ("loss", "loss_van", "loss_ep", "loss_rda", "loss_crt"):
            assert resumed[it][key] == pytest.approx(full[it][key], rel=1e-4, abs=1e-5), (it, key)


def test_connector_is_frozen_in_stage2(vitask_run, tmp_path, tiny_model, derma_data, tiny_tsm):
    work, _ = vitask_run
    at_16 = torch.load(work / "iter_16.pth", map_location="cpu", weights_only=False)["state_dict"]
    at_24 = torch.load(work / "iter_24.pth", map_location="cpu", weights_only=False)["state_dict"]
    for key in (k for k in at_16 if k.startswith("connector.")):
        assert torch.equal(at_16[key], at_24[key]), key
    lora = [k for k in at_16 if "lora_" in k]
    assert any(not torch.equal(at_16[k], at_24[k]) for k in lora)


def test_vitask_from_an_exemplar_cache_written_by_the_cli(tmp_path, tiny_model, derma_data, tiny_tsm):
    """README's workflow: `xtuner-vitask cache-exemplars`, then training with model.tsm=None (no TSM runs)."""
    from xtuner_vitask.cli.main import main
    from xtuner_vitask.tsm.exemplar_cache import ExemplarCache

    cache = tmp_path / "exemplars_cls.pt"
    assert main(["cache-exemplars", "--tsm", tiny_tsm, "--data", derma_data, "--out", str(cache), "--kind", "cls"]) == 0
    dim = ExemplarCache.load(str(cache)).feature_dim
    work = tmp_path / "work"
    proc = run_train("configs/vitask_tiny_cpu.py", work,
                     *vitask_options(tiny_model, derma_data, tiny_tsm, "model.tsm=None", f"model.exemplar_dim={dim}",
                                     f"train_dataloader.dataset.exemplar_cache={cache}", "train_cfg.max_epochs=None",
                                     "train_cfg.max_iters=4"))
    assert "Iter(train) [4/4]" in proc.stdout + proc.stderr
    state = torch.load(work / "iter_4.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("connector.") for k in state) and not any(k.startswith("tsm.") for k in state)
    assert any(".output.modules_to_save." in k for k in state)  # InternLM2's head trained ("auto")


def test_vitask_under_deepspeed_zero3_on_one_process(tmp_path, tiny_model_qwen2, derma_data, tiny_tsm):
    """On Qwen2 (InternVL2-1B's LLM: transformers' class, SDPA, lm_head); ZeRO-2 and ZeRO-3 on 2 processes:
    tests/test_distributed.py."""
    proc = run_train("configs/vitask_tiny_cpu.py", tmp_path,
                     *vitask_options(tiny_model_qwen2, derma_data, tiny_tsm, "custom_hooks.1.interval=1000"),
                     deepspeed="configs/deepspeed/zero3_cpu.json")
    log = proc.stdout + proc.stderr
    assert "VITask stage 2 from iteration 12" in log and "loss_crt" in log
    assert os.path.exists(tmp_path / "iter_24.pth")
