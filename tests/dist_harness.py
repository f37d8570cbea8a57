"""Multi-process training on CPU-only torch, for the tests: XTuner's train tool under torchrun (gloo).

Run as a script, this is the launch shim: what CPU-only torch needs and the plugin must not carry.
mmengine 0.10.6 calls ``torch.cuda.set_device(LOCAL_RANK)`` unconditionally when it starts a process
group, which fails without CUDA; the shim makes that call a no-op when no GPU is there, then runs
``xtuner.tools.train`` as ``__main__``. The other CPU need, DDP's ``device_ids=None`` (mmengine passes
``[LOCAL_RANK]``), is a config value: ``run_train_dist`` sets ``model_wrapper_cfg.device_ids=None``.
"""
import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relabel(src, dst, names, train_samples=None):
    """A copy of the converted set ``src`` whose classes are called ``names`` (images linked, not copied),
    with the first ``train_samples`` training records.

    The losses are token means per process, and DDP and DeepSpeed average the processes' gradients: one
    process over 8 samples and two over 4 each train the same model only when every response has the same
    number of tokens. DermaMNIST's label names have 2 to 7; single letters have one each.
    """
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "meta.json")) as f:
        meta = json.load(f)
    old, new = ", ".join(meta["label_names"]), ", ".join(names)
    meta.update(label_names=list(names), instruction=meta["instruction"].replace(old, new))
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f)
    for name in os.listdir(src):
        if name.endswith(".jsonl"):
            with open(os.path.join(src, name)) as fin, open(os.path.join(dst, name), "w") as fout:
                lines = fin.readlines()
                if name == "train.jsonl" and train_samples:
                    lines = lines[:train_samples]
                for line in lines:
                    record = json.loads(line)
                    human, gpt = record["conversations"]
                    human["value"] = human["value"].replace(old, new)
                    gpt["value"] = names[record["label"][0]]
                    fout.write(json.dumps(record) + "\n")
        elif name != "meta.json":
            os.symlink(os.path.join(os.path.abspath(src), name), os.path.join(dst, name))
    return dst


def run_train_dist(config, work_dir, *cfg_options, nproc=2, deepspeed=None, resume=None, timeout=1200, check=True):
    """``torchrun --nproc_per_node N`` of ``xtuner.tools.train CONFIG --launcher pytorch`` on CPU (gloo).

    torchrun's exit status is non-zero when any worker failed (``xtuner train`` would drop it).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__).resolve()),
           str(REPO / config), "--launcher", "pytorch", "--work-dir", str(work_dir)]
    if deepspeed:
        cmd += ["--deepspeed", str(REPO / deepspeed)]
    if resume:
        cmd += ["--resume", str(resume)]
    cmd += ["--cfg-options", "model_wrapper_cfg.device_ids=None", *cfg_options]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    # DeepSpeed compiles a small C++ op on first use; a folder per venv, because venvs sharing ~/.cache rebuild it
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


def main():
    import torch

    if not torch.cuda.is_available():
        torch.cuda.set_device = lambda device: None  # mmengine's init_dist calls it for every launcher
    sys.argv = ["xtuner.tools.train", *sys.argv[1:]]
    runpy.run_module("xtuner.tools.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
