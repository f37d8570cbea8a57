"""Shared fixtures: tiny InternVL2 checkpoints (InternLM2 by default; Qwen2 and Phi3), a generated
MedMNIST-layout set, a tiny TSM, and a runner for XTuner's real train tool (its exit status is checked;
the `xtuner` CLI drops it)."""
import glob
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process unless the caller chose: tests start training subprocesses and 2-process runs on a
# 2-core machine (oversubscription made runs up to 40x slower); set here so every CLI call sees the same env.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# transformers copies remote code into HF_MODULES_CACHE and imports it from there as one package for the whole
# process; it must be set once, before transformers is imported (changing it later breaks those imports).
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="xtuner_vitask_hf_modules_")


def end_gloo_worker():
    """Last call of a spawned 2-process gloo test worker: wait until every rank is past its last collective,
    then exit without gloo's teardown (its destructor once waited forever on a loaded 2-core machine, which
    would hang the whole suite; nothing is left to flush)."""
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(config, work_dir, *cfg_options, deepspeed=None, resume=None, timeout=900, check=True):
    """`python -m xtuner.tools.train CONFIG --work-dir DIR [...]`, from the repo root; returns the process."""
    cmd = [sys.executable, "-m", "xtuner.tools.train", str(REPO / config), "--work-dir", str(work_dir)]
    if deepspeed:
        cmd += ["--deepspeed", str(REPO / deepspeed)]
    if resume:
        cmd += ["--resume", str(resume)]
    if cfg_options:
        cmd += ["--cfg-options", *cfg_options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # DeepSpeed compiles a small C++ op on first use; a folder per venv, because venvs sharing ~/.cache rebuild it
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train tool failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _tiny(tmp_path_factory, llm):
    from xtuner_vitask.testing import build_tiny_internvl

    return str(build_tiny_internvl(tmp_path_factory.mktemp("models") / f"tiny_{llm}", llm=llm))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The default test checkpoint: InternVL2-2B's layout and InternLM2 remote code, tiny and random."""
    return _tiny(tmp_path_factory, llm="internlm2")


@pytest.fixture(scope="session")
def tiny_model_qwen2(tmp_path_factory):
    """InternVL2-1B's layout: transformers' Qwen2 (SDPA, Cache objects), byte-level BPE tokenizer."""
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_model_phi3(tmp_path_factory):
    """InternVL2-4B's layout with transformers' Phi3 (fused qkv_proj/gate_up_proj)."""
    return _tiny(tmp_path_factory, "phi3")


@pytest.fixture(scope="session")
def derma_data(tmp_path_factory):
    """A generated (learnable) 7-class DermaMNIST-layout set, converted by data_tools."""
    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    root = tmp_path_factory.mktemp("data")
    npz = write_medmnist_npz(root / "dermamnist.npz", "dermamnist", n_per_split=(96, 32, 32), size=28, seed=0)
    return str(convert_medmnist("dermamnist", 28, root / "dermamnist", npz_path=npz, progress=False))


@pytest.fixture(scope="session")
def tiny_tsm(tmp_path_factory, derma_data):
    """A tiny TSM trained through the train tool on ``derma_data``: the best checkpoint's path."""
    work = tmp_path_factory.mktemp("tsm")
    d = derma_data
    run_train("configs/tsm_tiny_cpu.py", work, f"train_dataloader.dataset.data_file={d}/train.jsonl",
              f"val_dataloader.dataset.data_file={d}/val.jsonl", f"test_dataloader.dataset.data_file={d}/test.jsonl",
              f"model.meta={d}/meta.json", "train_cfg.max_epochs=3")
    return glob.glob(str(work / "best_*.pth"))[0]


def vitask_options(tiny_model, data, tsm_checkpoint, *extra):
    """--cfg-options that point configs/vitask_tiny_cpu.py at the fixtures."""
    return (f"model.model_path={tiny_model}", f"train_dataloader.dataset.model_path={tiny_model}",
            f"train_dataloader.dataset.data_paths={data}/train.jsonl", f"model.tsm.meta={data}/meta.json",
            f"model.tsm.checkpoint={tsm_checkpoint}", f"train_dataloader.dataset.tsm_checkpoint={tsm_checkpoint}",
            *extra)
