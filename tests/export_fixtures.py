"""Shared by test_export.py and test_eval_cli.py: a tiny VITask trained by XTuner's train tool and its
two exports written by XTuner's own pth_to_hf, built once per session (cached under pytest's basetemp)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_train, vitask_options

TRAIN_ITERS = 3
CONFIG = "configs/vitask_tiny_cpu.py"


def converter_options(tiny_model, data, tsm_checkpoint):
    # model.llm=None: XTuner's pth_to_hf reads cfg.model.llm (harmless once the configs set it)
    return ("model.llm=None",) + vitask_options(tiny_model, data, tsm_checkpoint)


def pth_to_hf(checkpoint, out, options, *flags, check=True, config=REPO / CONFIG):
    """`python -m xtuner.tools.model_converters.pth_to_hf CONFIG PTH OUT [flags] [--cfg-options ...]`
    (the module, not `xtuner convert`, which exits 0 whatever happens)."""
    cmd = [sys.executable, "-m", "xtuner.tools.model_converters.pth_to_hf", str(config), str(checkpoint),
           str(out), *flags] + (["--cfg-options", *options] if options else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # HF_MODULES_CACHE: the session's (conftest)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"pth_to_hf failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc


def build_exports(tmp_path_factory, tiny_model, derma_data, tiny_tsm):
    """{'work', 'checkpoint', 'ep', 'plain', 'options'}: trained once per session."""
    root = tmp_path_factory.getbasetemp() / "vitask_exports"
    done = root / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    work = root / "train"
    run_train(CONFIG, work, *vitask_options(tiny_model, derma_data, tiny_tsm, "train_cfg.max_epochs=None",
                                            f"train_cfg.max_iters={TRAIN_ITERS}"))
    checkpoint = work / f"iter_{TRAIN_ITERS}.pth"
    options = converter_options(tiny_model, derma_data, tiny_tsm)
    # the EP export from the config mmengine dumped into the work dir: no training option repeated
    pth_to_hf(checkpoint, root / "export_ep", (), config=work / os.path.basename(CONFIG))
    pth_to_hf(checkpoint, root / "export_plain", options, "--save-format", "official")
    result = dict(work=str(work), checkpoint=str(checkpoint), ep=str(root / "export_ep"),
                  plain=str(root / "export_plain"), options=list(options))
    done.write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model, derma_data, tiny_tsm):
    return build_exports(tmp_path_factory, tiny_model, derma_data, tiny_tsm)
