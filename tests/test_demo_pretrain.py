"""The tiny generalist (`make-tiny --pretrain`, the demo's VLM): trained, cached, reproducible."""
import json

import pytest
import torch
from safetensors.torch import load_file

from xtuner_vitask.testing.pretrain import MARKER, PretrainSettings, build_pretrained_tiny, write_corpus

SMALL = PretrainSettings(n_images=48, colour_epochs=1, epochs=1, batch_size=16)  # 6 steps


def test_corpus_has_colour_phase_and_mixed_questions(tmp_path):
    colour, mixed = write_corpus(tmp_path, 20, 32, seed=3)
    colour_rows = [json.loads(line) for line in colour.read_text().splitlines()]
    mixed_rows = [json.loads(line) for line in mixed.read_text().splitlines()]
    assert len(colour_rows) == len(mixed_rows) == 20
    assert all("colour" in r["conversations"][0]["value"] for r in colour_rows)
    assert len({r["conversations"][0]["value"] for r in mixed_rows}) > 1  # several question kinds
    assert [r["image"] for r in colour_rows] == [r["image"] for r in mixed_rows]
    again, _ = write_corpus(tmp_path / "again", 20, 32, seed=3)
    assert again.read_text() == colour.read_text()


@pytest.mark.slow
def test_pretrained_tiny_trains_every_part_and_is_cached(tmp_path):
    from xtuner_vitask.testing import build_tiny_internvl

    random_dir = build_tiny_internvl(tmp_path / "random", llm="internlm2")
    out = build_pretrained_tiny(tmp_path / "pre", SMALL, progress=False, echo=None, llm="internlm2")
    record = json.loads((out / MARKER).read_text())
    assert record["steps"] == 6 and record["base"] == {"build_tiny_internvl": {"llm": "internlm2"}}
    before, after = load_file(str(random_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for part in ("vision_model.", "mlp1.", "language_model."):  # nothing frozen in pretraining
        changed = [k for k in before if k.startswith(part) and not torch.equal(before[k], after[k])]
        assert changed, part
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_pretrained_tiny(tmp_path / "pre", SMALL, progress=False, echo=None, llm="internlm2") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    twin = build_pretrained_tiny(tmp_path / "twin", SMALL, progress=False, echo=None, llm="internlm2")
    twin_weights = load_file(str(twin / "model.safetensors"))
    assert all(torch.equal(after[k], twin_weights[k]) for k in after)  # seeded: same weights


def test_make_tiny_pretrain_refuses_a_foreign_folder(tmp_path):
    import subprocess
    import sys

    (tmp_path / "mine.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "xtuner_vitask.cli.main", "make-tiny", str(tmp_path), "--pretrain"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a pretrained tiny model" in proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "mine.txt").read_text() == "keep me"
