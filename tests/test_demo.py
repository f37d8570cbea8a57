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
    assert f"train_cfg.max_epochs={s.stage1_epochs + s.stage2_epochs}" in v
    assert f"train_cfg.max_epochs={s.vanilla_epochs}" in n and s.vanilla_epochs == s.vitask_epochs
    assert f"custom_hooks.0.switch_epoch={s.stage1_epochs}" in v and "custom_hooks.1.batch_size=16" in v
    assert "custom_hooks.0.batch_size=16" in n and "randomness.seed=3" in n
    assert any("connector.lr_mult" in o for o in v)


def test_results_table_and_json(tmp_path):
    rows = [{"model": "vanilla", "accuracy": 0.25, "macro_f1": 0.1}, {"model": "vitask_ep", "accuracy": 0.8,
                                                                       "macro_f1": 0.75}]
    table = demo.results_table(rows, "generated")
    assert "| VITask w/ EP | 0.800 | 0.750 |" in table and "generated" in table.splitlines()[0]
    path = demo.write_json_atomic(tmp_path / "r.json", {"rows": rows})
    assert json.loads(path.read_text())["rows"][1]["model"] == "vitask_ep"


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


def test_ablation_tables_format_mean_and_std():
    import ablation

    cache = {"0": {"base": {"accuracy_no_ep": 0.5, "macro_f1_no_ep": 0.4, "accuracy_ep": 0.7, "macro_f1_ep": 0.6},
                   "tsm": {"accuracy": 0.9, "macro_f1": 0.88}},
             "1": {"base": {"accuracy_no_ep": 0.7, "macro_f1_no_ep": 0.6, "accuracy_ep": 0.9, "macro_f1_ep": 0.8}}}
    text = ablation.tables(cache)
    assert "| vanilla (L_van + L_EP) | 0.600 ± 0.141 | 0.500 ± 0.141 | 0.800 ± 0.141 | 0.700 ± 0.141 |" in text
    assert "| TSM | 0.900 ± 0.000 (n=1) | 0.880 ± 0.000 (n=1) |" in text and "n/a" in text


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    result = demo.run_demo(tmp_path / "demo", quick=True, echo=lambda s: None)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["data"] == "generated" and saved["wall_time_s"] > 0
    assert [r["model"] for r in saved["rows"]] == ["vanilla", "vitask_no_ep", "vitask_ep", "tsm"]
    for row in saved["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
    for png in ("confusion_vanilla.png", "confusion_vitask_ep.png", "confusion_tsm.png", "loss_curves.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
    assert result["chat"]["answer"] is not None
