"""benchmarks/bench_step.py in quick mode: every row, the JSON schema, the LLM work of each variant (tokens
through the decoder) exactly as the shared-prefix layout says, one ViT encode per image (no timing asserts)."""
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_rows_and_llm_work(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--quick", "--repeats", "2", "--warmup", "0", "--workdir", str(tmp_path / "work"),
                       "--json", str(tmp_path / "rows.json"), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in capsys.readouterr().out
    result = json.loads((tmp_path / "rows.json").read_text())
    rows = {(r["variant"], r["shared_prefix"]): r for r in result["rows"]}
    assert list(rows) == [("vanilla", False), ("stage1", False), ("stage1", True), ("stage2", False), ("stage2", True)]
    for r in result["rows"]:
        assert r["time_x"] > 0 and r["peak_x"] > 0 and r["step_ms"] > 0 and r["peak_mb"] > r["transient_mb"] > 0
    assert rows["vanilla", False]["time_x"] == 1.0 and rows["vanilla", False]["peak_x"] == 1.0

    s = result["setup"]
    assert s["image_tokens"] == 16 and bench.SYSTEM_TOKENS_ESTIMATE - 2 <= s["system_text_tokens"] <= bench.SYSTEM_TOKENS_ESTIMATE
    b, w, root, trunk = s["batch_size"], s["padded_length"], s["root_end"], s["trunk_end"]
    assert 0 < root < trunk < w
    w_ep = w + 1  # EP_cls: one exemplar token per sample
    tokens = {key: r["llm_tokens"] for key, r in rows.items()}
    assert tokens["vanilla", False] == b * w
    assert tokens["stage1", False] == b * w + b * w_ep
    assert tokens["stage1", True] == b * w + b * (w_ep - trunk)  # EP runs its suffix on the plain pass's trunk
    assert tokens["stage2", False] == 2 * b * w + b * w_ep
    assert tokens["stage2", True] == b * w + b * (w_ep - trunk) + b * (w - root)  # the negative on the root
    # the frozen ViT encodes each distinct image once: the batch, plus stage 2's negatives from outside it
    for (variant, _), r in rows.items():
        assert r["vit_images"] == b + (s["extra_negative_images"] if variant == "stage2" else 0)
    assert 0 < s["vit_share"] < 1
    for r in result["rows"]:
        assert abs(r["floor_x"] - (s["vit_share"] + (1 - s["vit_share"]) * r["llm_tokens_x"])) < 1e-9
