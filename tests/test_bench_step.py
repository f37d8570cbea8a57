"""benchmarks/bench_step.py in quick mode: the table has every variant, the counts hold (no timing asserts)."""
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


def test_quick_benchmark_table_and_counts(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--quick", "--repeats", "2", "--warmup", "0", "--workdir", str(tmp_path / "work"),
                       "--json", str(tmp_path / "rows.json"), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in capsys.readouterr().out
    names = ["vanilla", "stage 1 (TSM)", "stage 1 (cache)", "stage 2 (TSM)", "stage 2 (cache)",
             "stage 2 (cache, one-class batch)"]
    for name in names:
        assert f"| {name} |" in table
    rows = {r["variant"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert list(rows) == names
    # the exemplar cache replaces the TSM: no TSM forward at all; in the loop, one batched forward
    for name in names:
        if "cache" in name:
            assert rows[name]["tsm_forwards"] == 0, name
    assert rows["stage 1 (TSM)"]["tsm_forwards"] == 1 and rows["stage 1 (TSM)"]["tsm_images"] == 8
    # the frozen ViT encodes each distinct image once; the LLM runs the floor's passes
    for name, row in rows.items():
        assert row["vit_images"] == row["distinct_images"], name
    assert [rows[n]["llm_passes"] for n in names] == [1, 2, 2, 3, 3, 3]
    # a one-class batch has no in-batch negative: its negatives are extra images, each encoded once
    assert rows["stage 2 (cache, one-class batch)"]["vit_images"] > 8
    for row in rows.values():
        assert row["step_ms"] > 0 and row["transient_mb"] > 0 and row["peak_mb"] > row["transient_mb"]
    assert rows["vanilla"]["time_x"] == 1.0
