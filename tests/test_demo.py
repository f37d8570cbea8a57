"""The demo pipeline's pieces (fast) and the whole `--quick` demo end to end (slow)."""
import argparse
import json
import sys
from pathlib import Path

import pytest

from xtuner_vitask import demo
from xtuner_vitask.cli import demo as demo_cli
from xtuner_vitask.errors import VITaskError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_progress_line_shortens_train_tool_steps():
    line = ("11/29 15:09:28 - mmengine - INFO - Iter(train) [ 43/140]  base_lr: 2.0000e-03 lr: 2.0000e-03  "
            "time: 0.1431  grad_norm: 3.0519  loss: 2.2176  loss_van: 1.1092  loss_ep: 1.1083  loss_rda: 0.0001")
    assert demo.progress_line("vitask", line) == "[vitask] step 43/140  loss=2.218 van=1.109 ep=1.108 rda=0.000"
    tsm = "11/29 - mmengine - INFO - Epoch(train) [2][ 5/18]  lr: 3.1e-04  loss: 1.9115"
    assert demo.progress_line("tsm", tsm) == "[tsm] epoch 2 step 5/18  loss=1.911"
    val = "11/29 - mmengine - INFO - Epoch(val) [8][5/5]    accuracy: 0.8286  macro_f1: 0.8435  auc: 0.98"
    assert demo.progress_line("tsm", val) == "[tsm] epoch 8 val accuracy=0.829 macro_f1=0.844"
    assert demo.progress_line("vitask", "VITask stage 2 from iteration 12: connector frozen, CRT on").startswith(
        "[vitask] VITask stage 2")
    assert demo.progress_line("x", "Checkpoints will be saved to /tmp") is None


def test_generated_data_is_labelled_generated(tmp_path):
    data = demo.make_data(tmp_path, "octmnist", n_per_split=(12, 4, 8), seed=1)
    meta = demo.read_meta(data)
    assert meta["generated"] and demo.data_label(meta) == "generated"
    assert sum(1 for _ in open(data / "test.jsonl")) == 8
    inc = demo.make_data(tmp_path, "octmnist", n_per_split=(12, 4, 8), seed=1, instruction_variant="incomplete")
    assert demo.read_meta(inc)["instruction_variant"] == "incomplete" and inc != data
    assert demo.data_label({"dataset": "octmnist", "generated": False}) == "octmnist"


def test_options_point_both_recipes_at_the_same_files(tmp_path):
    s = demo.FULL
    v = demo.vitask_options("M", tmp_path, "T.pth", s, seed=3)
    n = demo.vanilla_options("M", tmp_path, s, seed=3)
    train_file = f"train_dataloader.dataset.data_paths={tmp_path / 'train.jsonl'}"
    assert train_file in v and train_file in n
    for same in ("randomness.seed=3", "train_dataloader.sampler.seed=3", "model.model_path=M"):
        assert same in v and same in n
    # the schedule is the configs' own: the demo passes none of it
    for opt in v + n:
        assert not opt.startswith(("train_cfg", "param_scheduler", "optim_wrapper", "custom_hooks.0.switch_epoch"))


def test_tiny_configs_share_one_schedule():
    """Fair protocol: the two tiny recipes have the same steps, batch, data order, lr and schedule rule."""
    from mmengine.config import Config

    from xtuner_vitask.config_files import config_path

    v = Config.fromfile(str(demo.config_file("vitask")))
    n = Config.fromfile(str(demo.config_file("vanilla")))
    assert demo.config_file("vitask") == config_path("vitask_tiny_demo")  # shipped in the package, wheel or not
    assert v.train_cfg.max_epochs == n.train_cfg.max_epochs == v.stage1_epochs + v.stage2_epochs
    assert v.train_dataloader.batch_size == n.train_dataloader.batch_size
    assert v.train_dataloader.sampler.seed == n.train_dataloader.sampler.seed
    assert v.optim_wrapper.optimizer.lr == n.optim_wrapper.optimizer.lr
    assert v.optim_wrapper.clip_grad == n.optim_wrapper.clip_grad
    strip = [{k: val for k, val in s.items()} for s in v.param_scheduler], [dict(s) for s in n.param_scheduler]
    assert strip[0] == strip[1] and len(strip[0]) == 2  # warm-up then cosine over every step, both recipes
    assert {k: v.model.llm_lora[k] for k in ("r", "lora_alpha", "target_modules", "modules_to_save")} == \
        {k: n.model.llm_lora[k] for k in ("r", "lora_alpha", "target_modules", "modules_to_save")}


def test_connector_group_starts_at_its_lr_mult():
    import torch

    from xtuner_vitask.engine.param_groups import optimizer_with_param_groups, tag_param_group

    model = torch.nn.ModuleDict({"llm": torch.nn.Linear(2, 2), "connector": torch.nn.Linear(2, 2)})
    tag_param_group(model["connector"], "connector")
    opt = optimizer_with_param_groups(model.parameters(), lr=2e-3, weight_decay=0.0, lr_mult={"connector": 10.0})
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-2])
    assert opt.param_groups[1]["name"] == "connector" and len(opt.param_groups[1]["params"]) == 2
    plain = optimizer_with_param_groups(model.parameters(), lr=2e-3)
    assert [g["lr"] for g in plain.param_groups] == pytest.approx([2e-3, 2e-3])


def test_stage2_start_counts_stage1_steps():
    from mmengine.config import Config

    cfg = Config.fromfile(str(demo.config_file("vitask")))
    assert demo.stage2_start(17) == cfg.stage1_epochs * -(-17 // cfg.train_dataloader.batch_size)


def test_external_domain_keeps_labels_and_shifts_images(tmp_path):
    import numpy as np

    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    src = np.load(write_medmnist_npz(tmp_path / "s.npz", "octmnist", (40, 8, 8), seed=2, style="shapes"))
    ext = np.load(write_medmnist_npz(tmp_path / "e.npz", "octmnist", (40, 8, 8), seed=2, style="shapes",
                                     domain="external"))
    assert (src["train_labels"] == ext["train_labels"]).all()  # same classes, same draw
    assert src["train_images"].shape == ext["train_images"].shape and src["train_images"].dtype == np.uint8
    assert abs(float(src["train_images"].mean()) - float(ext["train_images"].mean())) > 2.0
    assert json.loads((tmp_path / "e.npz.generated.json").read_text())["domain"] == "external"
    with pytest.raises(ValueError, match="domain"):
        write_medmnist_npz(tmp_path / "x.npz", "octmnist", (4, 2, 2), style="grating", domain="external")


def test_results_table_and_json(tmp_path):
    rows = [{"model": "vanilla", "accuracy": 0.25, "macro_f1": 0.1}, {"model": "vitask_ep", "accuracy": 0.8,
                                                                       "macro_f1": 0.75}]
    table = demo.results_table(rows, "generated")
    assert "| VITask w/ EP | 0.800 | 0.750 |" in table and "generated" in table.splitlines()[0]
    path = demo.write_json_atomic(tmp_path / "r.json", {"rows": rows})
    assert json.loads(path.read_text())["rows"][1]["model"] == "vitask_ep"


def test_seed_rows_mean_std_and_the_paired_line():
    """Several seeds: the table shows mean ± std, results keep every seed, the central claim is paired per seed."""
    def rows(van, no_ep):
        return [{"model": "vanilla", "accuracy": van, "macro_f1": van}, {"model": "vitask_no_ep", "accuracy": no_ep,
                                                                         "macro_f1": no_ep}]

    agg = demo.seed_rows({0: rows(0.2, 0.5), 1: rows(0.4, 0.3), 2: rows(0.3, 0.4)})
    assert [r["model"] for r in agg] == ["vanilla", "vitask_no_ep"]
    assert agg[0]["macro_f1"] == pytest.approx(0.3) and agg[0]["macro_f1_std"] == pytest.approx(0.1)
    assert agg[1]["per_seed"]["1"]["accuracy"] == 0.3
    assert "| VITask w/o EP | 0.400 ± 0.100 | 0.400 ± 0.100 |" in demo.results_table(agg, "generated")
    line = demo.paired_line(agg)
    assert "+0.300, -0.100, +0.100" in line and "mean +0.100 ± 0.200" in line and "above in 2/3" in line
    one = demo.seed_rows({5: rows(0.2, 0.5)})
    assert one[0]["macro_f1_std"] == 0.0 and "| VITask w/o EP | 0.500 | 0.500 |" in demo.results_table(one, "x")


def test_demo_cli_seeds_default_and_bad_value(monkeypatch):
    called = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: called.update(kw))
    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    demo_cli.run(parser.parse_args(["--out", "x"]))
    assert called["seeds"] == 3 and called["seed"] == 0 and not called["quick"]
    demo_cli.run(parser.parse_args(["--quick"]))
    assert called["seeds"] == 1
    with pytest.raises(VITaskError, match="--seeds 0"):
        demo_cli.run(parser.parse_args(["--seeds", "0"]))


def test_final_checkpoint_picks_the_last_iteration(tmp_path):
    for name in ("iter_9.pth", "iter_140.pth", "best_macro_f1_no_ep_iter_200.pth"):
        (tmp_path / name).write_bytes(b"")
    assert demo.final_checkpoint(tmp_path).name == "iter_140.pth"
    with pytest.raises(VITaskError, match="no iter_"):
        demo.final_checkpoint(tmp_path / "missing")


def test_cli_checks_its_arguments():
    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    with pytest.raises(VITaskError, match="--download needs --flag"):
        demo_cli.run(parser.parse_args(["--download"]))
    with pytest.raises(VITaskError):
        demo_cli.run(parser.parse_args(["--flag", "nosuchmnist"]))


def test_ablation_tables_and_paired_claims():
    import ablation

    def run(f1_no, f1_ep=None):
        return {"accuracy_no_ep": f1_no, "macro_f1_no_ep": f1_no, **({} if f1_ep is None else
                                                                    {"accuracy_ep": f1_ep, "macro_f1_ep": f1_ep})}

    cache = {"0": {"vanilla": run(0.2), "+both": run(0.4, 0.8), "tsm": {"accuracy": 0.9, "macro_f1": 0.88}},
             "1": {"vanilla": run(0.3), "+both": run(0.4, 0.9)},
             "2": {"vanilla": run(0.1), "+both": run(0.3, 0.7)}}
    text = ablation.tables(cache)
    assert "| +both (VITask) | 0.367 ± 0.058 | 0.367 ± 0.058 | 0.800 ± 0.100 | 0.800 ± 0.100 |" in text
    assert "| TSM | 0.900 ± 0.000 (n=1) | 0.880 ± 0.000 (n=1) |" in text and "n/a" in text
    lines, verdicts = ablation.claim_lines(cache)
    # +0.167 ± 0.058, 3/3 seeds; arms' seed std 0.100 (vanilla) and 0.058
    assert verdicts["main"] == "reproduced (+0.05 target met: margin +0.167 vs the arms' seed std 0.100)"
    assert any("| +0.167 ± 0.058 | 3/3 |" in line for line in lines)
    cache["1"]["+both"] = run(0.25, 0.9)  # one seed lost: not reproduced
    assert ablation.claim_lines(cache)[1]["main"].startswith("not reproduced")
    mean, sd, wins, n, p = ablation.paired({"0": 0.5, "1": 0.7}, {"0": 0.4, "1": 0.4})
    assert (round(mean, 3), wins, n) == (0.2, 2, 2) and 0 < p < 0.5
    # diagnostics (no verdict) and the per-seed table
    for seed, (base, fwd) in {"0": (0.5, 0.45), "1": (0.6, 0.5), "2": (0.4, 0.5)}.items():
        cache[seed]["base"], cache[seed]["RDA_fwd"] = run(base, 0.9), run(fwd)
    diag = ablation.diagnostic_lines(cache)
    assert any(line.startswith("| training with the EP pass") and "| +0.300 ± 0.000 | 3/3 |" in line for line in diag)
    assert any(line.startswith("| RDA with KL(EP || plain)") and line.endswith("| n/a | | |") for line in diag)
    per_seed = ablation.per_seed_lines(cache)
    assert "| base | 0.500 | 0.600 | 0.400 |" in per_seed and "| RDA_fwd | 0.450 | 0.500 | 0.500 |" in per_seed
    assert "Diagnostics" in ablation.tables(cache)


def test_ablation_rejects_unknown_runs(capsys):
    import ablation

    with pytest.raises(SystemExit):
        ablation.main(["--runs", "vanilla,+nothing", "--report-only", "--out", "/nonexistent/x"])
    assert "+nothing" in capsys.readouterr().err


# The demo end to end (`demo --quick`) runs from a wheel install: tests/test_packaging.py.
