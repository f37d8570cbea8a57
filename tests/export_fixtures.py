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


def pth_to_hf(checkpoint, out, options, *flags, check=True, modules_cache=None):
    """`python -m xtuner.tools.model_converters.pth_to_hf CONFIG PTH OUT [flags] --cfg-options ...`."""
    cmd = [sys.executable, "-m", "xtuner.tools.model_converters.pth_to_hf", str(REPO / CONFIG), str(checkpoint),
           str(out), *flags, "--cfg-options", *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if modules_cache:
        env["HF_MODULES_CACHE"] = str(modules_cache)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"pth_to_hf failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc


def build_exports(tmp_path_factory, tiny_model, derma_data, tiny_tsm):
    """{'work', 'checkpoint', 'ep', 'plain', 'options', 'modules_cache'}: trained once per session."""
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
    cache = root / "hf_modules"
    pth_to_hf(checkpoint, root / "export_ep", options, modules_cache=cache)
    pth_to_hf(checkpoint, root / "export_plain", options, "--save-format", "official", modules_cache=cache)
    result = dict(work=str(work), checkpoint=str(checkpoint), ep=str(root / "export_ep"),
                  plain=str(root / "export_plain"), options=list(options), modules_cache=str(cache))
    done.write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def offline_modules(tmp_path_factory):
    """transformers' copies of remote code go to a temporary folder (no hub, no ~/.cache writes)."""
    import transformers.dynamic_module_utils as dynamic_modules

    cache = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_MODULES_CACHE", cache)
        patch.setattr(dynamic_modules, "HF_MODULES_CACHE", cache)
        yield cache


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model, derma_data, tiny_tsm):
    return build_exports(tmp_path_factory, tiny_model, derma_data, tiny_tsm)
