"""The InternVL2-2B dry run (benchmarks/dry_run_2b.py): the shipped 2B config, changed only in its paths and the
run's size, trained across the stage switch with its eval hook, exported with pth_to_hf and evaluated.

- ``slow``: on the shrunk preset (``--size tiny``: InternVL2-2B's remote code, tokenizer, 448 px tiles and 256
  image tokens, narrow and 2 layers deep), a few minutes on 2 cores.
- ``fullsize`` (opt-in, not in ``make test``): the real size, ~15 GB of memory and tens of CPU minutes:
      VITASK_DRY_RUN_CACHE=~/.cache/xtuner_vitask .venv/bin/python -m pytest -m fullsize tests/test_dry_run_2b.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lora_parameters(config, r=128):
    """LoRA parameters of the 2B config's targets (InternLM2's wqkv, wo, w1, w2, w3) in every LLM layer."""
    llm = config["llm_config"]
    hidden, inter = llm["hidden_size"], llm["intermediate_size"]
    head = hidden // llm["num_attention_heads"]
    qkv = (llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) * head
    per_layer = r * ((hidden + qkv) + (hidden + hidden) + 2 * (hidden + inter) + (inter + hidden))
    return llm["num_hidden_layers"] * per_layer


def connector_parameters(feature_dim, hidden):
    """ExemplarConnector: LayerNorm(d) -> Linear(d, H) -> GELU -> Linear(H, H)."""
    return 2 * feature_dim + feature_dim * hidden + hidden + hidden * hidden + hidden


def run_dry_run(cache, size, work):
    out = work / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dry_run_2b.py"), "--cache", str(cache),
                           "--size", size, "--work", str(work / "run"), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


def check(result, stdout, tsm_feature_dim):
    config = json.loads((Path(result["model"]) / "config.json").read_text())
    hidden = config["llm_config"]["hidden_size"]
    assert result["trainable"]["lora"] == lora_parameters(config)
    assert result["trainable"]["connector"] == connector_parameters(tsm_feature_dim, hidden)
    assert result["trainable"]["other"] == 0  # vision encoder and mlp1 frozen: not in the checkpoint
    assert len(result["stage1_iter_s"]) == len(result["stage2_iter_s"]) == result["iters_per_stage"]
    assert result["eval_hook_line"].startswith(f"VITaskEvalHook iter {2 * result['iters_per_stage']} on 2 val")
    assert result["eval_n"] == 2
    assert {"config.json", "modeling_vitask.py", "tsm", "task_meta.json"} <= set(result["export_files"])
    assert result["image_tokens"] == 256 and min(result["tokens_per_sample"]) > 256
    assert "| stage 2 s/iteration" in stdout and "| trainable parameters |" in stdout


@pytest.mark.slow
def test_dry_run_on_the_shrunk_preset(tmp_path):
    result, stdout = run_dry_run(tmp_path / "cache", "tiny", tmp_path)
    check(result, stdout, tsm_feature_dim=192)  # configs/tsm_tiny_cpu.py: vit_tiny, 192 wide


@pytest.mark.slow
@pytest.mark.fullsize
@pytest.mark.skipif(not os.environ.get("VITASK_DRY_RUN_CACHE"),
                    reason="opt-in: set VITASK_DRY_RUN_CACHE=<folder for the 4.4 GB checkpoint> (~15 GB of memory)")
def test_dry_run_at_full_size(tmp_path):
    result, stdout = run_dry_run(Path(os.environ["VITASK_DRY_RUN_CACHE"]).expanduser(), "full", tmp_path)
    check(result, stdout, tsm_feature_dim=192)
    assert 2.1e9 < result["parameters_b"] * 1e9 < 2.3e9
    assert result["trainable"]["lora"] == 125_829_120  # r=128 on 24 InternLM2-1.8B layers
    print(stdout)
