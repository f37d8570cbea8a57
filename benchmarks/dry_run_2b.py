"""A real-size dry run of ``configs/vitask_internvl2_2b_derma.py`` on CPU: every step a user runs, at
InternVL2-2B's size, with random weights.

    python benchmarks/dry_run_2b.py --cache ~/.cache/xtuner_vitask [--work DIR] [--size full|small|tiny]

1. an InternVL2-2B-shaped checkpoint (``xtuner-vitask make-tiny --preset internvl2-2b``: InternViT-300M-448px +
   InternLM2-1.8B, OpenGVLab's remote code, random bf16 weights, 4.4 GB), built once into ``--cache``;
2. a small generated DermaMNIST-layout set, converted by data_tools (``--batch-size`` x ``--iters-per-stage``
   training images, 2 val, 2 test) and the tiny TSM trained on it (``configs/tsm_tiny_cpu.py``: the 2B config
   takes any TSM checkpoint);
3. ``python -m xtuner.tools.train configs/vitask_internvl2_2b_derma.py`` with ``--cfg-options`` that change only
   its paths and the run's size (batch size, a per-iteration log); the config's own ``switch_epoch=1`` switches
   to stage 2 after the first epoch, and its eval hook evaluates after the last iteration. Without a GPU the
   config's ``amp_optim_wrapper`` trains in fp32 with OptimWrapper (the one CPU switch, engine/optim.py);
4. ``python -m xtuner.tools.model_converters.pth_to_hf`` of the last checkpoint, then ``xtuner-vitask eval`` of
   the export on two test samples;
5. a table: seconds per stage-1 / stage-2 iteration, peak RSS of each process, trainable parameters (LoRA,
   connector; counted in the checkpoint), export time and size, tokens per sample.

``--size small`` / ``tiny`` shrink the preset (fewer layers; tiny also narrower) for developing this script;
the image tiles stay 448 px, so tokens per sample are the real size's. Full size needs about 15 GB of memory
and, on 2 CPU cores, tens of minutes; it refuses to start with less than ``--min-free-gib`` available.
"""
import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAME, TSM_CONFIG_NAME = "vitask_internvl2_2b_derma", "tsm_tiny_cpu"
PRESET = "internvl2-2b"
SIZES = {  # preset overrides (see xtuner_vitask.testing.tiny_internvl.preset_config_dict)
    "full": None,
    "small": {"vision": {"num_layers": 2}, "llm": {"num_hidden_layers": 2}},
    "tiny": {"vision": {"hidden": 64, "num_layers": 1, "heads": 4, "intermediate": 128},
             "llm": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2}},
}
MIN_FREE_GIB = {"full": 16.0, "small": 5.0, "tiny": 2.0}


class DryRunError(Exception):
    pass


# ------------------------------------------------------------------------------------------ processes
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run(name, cmd, log_dir, env=None):
    """Run ``cmd``, its output into ``log_dir/name.log``; (seconds, peak RSS GiB of it and its children)."""
    log = Path(log_dir) / f"{name}.log"
    print(f"[{datetime.now():%H:%M:%S}] {name}: {' '.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest of the process and its waited children
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise DryRunError(f"{name} failed with exit status {proc.returncode} (log: {log}):\n{tail}")
    rss = usage.ru_maxrss / 2**20
    print(f"    {seconds:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    return seconds, rss


def train_env():
    return dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), TOKENIZERS_PARALLELISM="false")


# -------------------------------------------------------------------------------------------- inputs
def ensure_model(cache, size, log_dir):
    """The preset folder in ``cache`` (built once; a folder holding another architecture is refused)."""
    from xtuner_vitask.testing.tiny_internvl import preset_config_dict

    folder = Path(cache).expanduser().absolute() / (PRESET if size == "full" else f"{PRESET}-{size}")
    expected = preset_config_dict(PRESET, SIZES[size])
    config = folder / "config.json"
    if config.is_file():
        found = json.loads(config.read_text())
        for part, keys in (("vision_config", ("hidden_size", "num_hidden_layers", "image_size")),
                           ("llm_config", ("hidden_size", "num_hidden_layers", "vocab_size"))):
            if any(found.get(part, {}).get(k) != expected[part][k] for k in keys):
                raise DryRunError(f"{folder} holds another model than {PRESET} ({size}): remove it or pass "
                                  "another --cache")
        print(f"model: {folder} (cached)")
        return folder, 0.0
    if size == "full":
        cmd = [Path(sys.executable).with_name("xtuner-vitask"), "make-tiny", "--preset", PRESET, folder]
    else:
        code = ("import json, sys; from xtuner_vitask.testing import build_internvl2_preset; "
                "build_internvl2_preset(sys.argv[1], preset=sys.argv[2], overrides=json.loads(sys.argv[3]))")
        cmd = [sys.executable, "-c", code, folder, PRESET, json.dumps(SIZES[size])]
    seconds, _ = run("make_model", cmd, log_dir)
    return folder, seconds


def make_data(work, n_train, image_size):
    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    npz = write_medmnist_npz(work / "npz" / "dermamnist.npz", "dermamnist", n_per_split=(n_train, 2, 2),
                             size=image_size, seed=0)
    return Path(convert_medmnist("dermamnist", image_size, work / f"dermamnist_{image_size}", npz_path=npz,
                                 progress=False))


def train_tsm(work, data, log_dir):
    from xtuner_vitask.config_files import config_path

    tsm_work = work / "tsm"
    run("train_tsm", [sys.executable, "-m", "xtuner.tools.train", config_path(TSM_CONFIG_NAME), "--work-dir", tsm_work,
                      "--cfg-options", f"train_dataloader.dataset.data_file={data}/train.jsonl",
                      f"val_dataloader.dataset.data_file={data}/val.jsonl",
                      f"test_dataloader.dataset.data_file={data}/test.jsonl", f"model.meta={data}/meta.json",
                      "train_cfg.max_epochs=1"], log_dir, train_env())
    found = sorted(glob.glob(str(tsm_work / "best_*.pth")))
    if not found:
        raise DryRunError(f"the TSM run wrote no best_*.pth into {tsm_work}")
    return Path(found[-1])


def path_options(model, data, tsm):
    """--cfg-options that point the 2B config at the dry run's files (its PART 1 paths)."""
    return [f"model.model_path={model}", f"train_dataloader.dataset.model_path={model}",
            f"train_dataloader.dataset.data_paths={data}/train.jsonl", f"model.tsm.meta={data}/meta.json",
            f"model.tsm.checkpoint={tsm}", f"train_dataloader.dataset.tsm_checkpoint={tsm}"]


# ---------------------------------------------------------------------------------------- measurements
def tokens_per_sample(model, data):
    """Tokens of each training sample as the config's dataset builds them (image tokens included)."""
    from xtuner_vitask.datasets import InternVL2Dataset

    ds = InternVL2Dataset(str(model), f"{data}/train.jsonl", dynamic_image_size=False, max_length=4096)
    return [len(ds[i]["input_ids"]) for i in range(len(ds))], ds.patch_token


def iteration_times(work_dir):
    """[(iteration, seconds, data-wait seconds, has loss_crt)] from the run's vis_data/scalars.json (logged every
    iteration; IterTimerHook's time includes the data wait)."""
    found = sorted(glob.glob(str(Path(work_dir) / "*" / "vis_data" / "scalars.json")))
    if not found:
        raise DryRunError(f"no vis_data/scalars.json under {work_dir}")
    rows = [json.loads(line) for line in Path(found[-1]).read_text().splitlines() if line.strip()]
    return [(r["step"], r["time"], r.get("data_time", 0.0), "loss_crt" in r) for r in rows if "time" in r and "step" in r]


def log_stamp(line):
    m = re.match(r"(\d\d/\d\d \d\d:\d\d:\d\d) - mmengine", line)  # mmengine's "11/30 15:18:34 - mmengine"
    return datetime.strptime(m.group(1), "%m/%d %H:%M:%S") if m else None


def eval_hook_seconds(train_log, last_iter):
    """Seconds from the last iteration's log line to the eval hook's result line (second resolution)."""
    lines = Path(train_log).read_text(errors="replace").splitlines()
    start = next((log_stamp(l) for l in lines if re.search(rf"Iter\(train\) \[\s*{last_iter}/", l)), None)
    end = next((log_stamp(l) for l in lines if f"VITaskEvalHook iter {last_iter} on" in l), None)
    result = next((l.split(" - ")[-1] for l in lines if f"VITaskEvalHook iter {last_iter} on" in l), None)
    return (end - start).total_seconds() if start and end else None, result


def trainable_parameters(checkpoint):
    """{LoRA, connector, other}: parameters saved in the checkpoint's state_dict (the trained tensors only)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    counts = {"lora": 0, "connector": 0, "other": 0}
    for name, tensor in state.items():
        kind = "lora" if "lora_" in name else "connector" if name.startswith("connector.") else "other"
        counts[kind] += tensor.numel()
    return counts


def folder_gb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9


def model_parameters(model):
    index = Path(model) / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["metadata"]["total_size"] / 2  # bf16
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="folder for the preset checkpoint (built once, ~4.4 GB)")
    parser.add_argument("--work", default=None, help="work folder (default: CACHE/dry_run_<size>, replaced)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full (default) or a shrunk preset")
    parser.add_argument("--batch-size", type=int, default=2, help="per-iteration batch (default 2; the config: 8)")
    parser.add_argument("--iters-per-stage", type=int, default=2, help="iterations per stage (default 2)")
    parser.add_argument("--image-size", type=int, default=224, choices=(28, 64, 128, 224),
                        help="MedMNIST size of the generated set (default 224, the config's)")
    parser.add_argument("--min-free-gib", type=float, default=None,
                        help="refuse to start below this much available memory (default: full 16, small 5, tiny 2)")
    parser.add_argument("--cfg-option", action="append", default=[], metavar="KEY=VALUE",
                        help="one more --cfg-options entry for the training and the export (repeatable); the table "
                             "lists them")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    need = MIN_FREE_GIB[args.size] if args.min_free_gib is None else args.min_free_gib
    free = available_gib()
    if free < need:
        raise DryRunError(f"{free:.1f} GiB available, the {args.size} dry run needs about {need:.0f} GiB: free memory "
                          "or pass --min-free-gib")
    cache = Path(args.cache).expanduser().absolute()
    work = Path(args.work).expanduser().absolute() if args.work else cache / f"dry_run_{args.size}"
    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"dry run ({args.size}): work {work}, {free:.1f} GiB available, OMP_NUM_THREADS={threads}", flush=True)

    model, build_s = ensure_model(cache, args.size, logs)
    n_train = args.batch_size * args.iters_per_stage  # one epoch = one stage (the config's switch_epoch=1)
    data = make_data(work, n_train, args.image_size)
    tsm = train_tsm(work, data, logs)
    paths = path_options(model, data, tsm) + list(args.cfg_option)
    from xtuner_vitask.config_files import config_path

    config = config_path(CONFIG_NAME)

    train_dir = work / "train"
    run_size = [f"train_dataloader.batch_size={args.batch_size}", "default_hooks.logger.interval=1",
                "log_processor.window_size=1"]
    train_s, train_rss = run("train", [sys.executable, "-m", "xtuner.tools.train", config, "--work-dir", train_dir,
                                       "--cfg-options", *paths, *run_size], logs, train_env())
    iters = iteration_times(train_dir)
    last = max(it[0] for it in iters)
    train_log = logs / "train.log"
    text = train_log.read_text(errors="replace")
    switch = re.search(r"VITask stage 2 from iteration (\d+)", text)
    if not switch or int(switch.group(1)) != args.iters_per_stage:
        raise DryRunError(f"the run did not switch to stage 2 after iteration {args.iters_per_stage} ({train_log})")
    eval_s, eval_line = eval_hook_seconds(train_log, last)
    if eval_line is None:
        raise DryRunError(f"the eval hook did not evaluate at iteration {last} ({train_log})")
    checkpoint = train_dir / f"iter_{last}.pth"
    params = trainable_parameters(checkpoint)

    export = work / "export"
    export_s, export_rss = run("export", [sys.executable, "-m", "xtuner.tools.model_converters.pth_to_hf", config,
                                          checkpoint, export, "--cfg-options", *paths], logs, train_env())
    eval_dir = work / "eval"
    cli = Path(sys.executable).with_name("xtuner-vitask")
    eval_cli_s, eval_rss = run("eval", [cli, "eval", export, "--data", f"{data}/test.jsonl", "--max-samples", "2",
                                        "--out", eval_dir], logs, train_env())
    report = json.loads((eval_dir / "eval.json").read_text())
    tokens, image_tokens = tokens_per_sample(model, data)

    stage1 = [(t, d) for _, t, d, crt in iters if not crt]
    stage2 = [(t, d) for _, t, d, crt in iters if crt]
    results = {
        "size": args.size, "model": str(model), "parameters_b": model_parameters(model) / 1e9,
        "build_model_s": build_s, "batch_size": args.batch_size, "iters_per_stage": args.iters_per_stage,
        "omp_num_threads": threads, "extra_cfg_options": list(args.cfg_option), "tokens_per_sample": tokens, "image_tokens": image_tokens,
        "stage1_iter_s": stage1, "stage2_iter_s": stage2, "train_process_s": train_s, "train_peak_rss_gib": train_rss,
        "eval_hook_s": eval_s, "eval_hook_line": eval_line, "trainable": params,
        "export_s": export_s, "export_peak_rss_gib": export_rss, "export_gb": folder_gb(export),
        "export_files": sorted(p.name for p in export.iterdir()),
        "eval_cli_s": eval_cli_s, "eval_peak_rss_gib": eval_rss, "eval_n": sum(t["n"] for t in report["tasks"].values()),
    }
    (work / "dry_run_2b.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    return 0


def print_table(r):
    fmt = lambda xs: " / ".join(f"{t:.1f} ({d:.1f})" for t, d in xs)  # noqa: E731
    rows = [
        ("model", f"{PRESET} ({r['size']}), {r['parameters_b']:.2f} B parameters, random bf16 weights, trained in fp32"),
        ("tokens per sample", f"{min(r['tokens_per_sample'])}-{max(r['tokens_per_sample'])} "
                              f"({r['image_tokens']} image tokens; +1 exemplar token with EP)"),
        ("batch, iterations", f"{r['batch_size']}, {r['iters_per_stage']} per stage (switch after epoch 1), "
                              f"OMP_NUM_THREADS={r['omp_num_threads']}"),
        ("stage 1 s/iteration (data wait)", fmt(r["stage1_iter_s"])),
        ("stage 2 s/iteration (data wait)", fmt(r["stage2_iter_s"]) + " (the first waits for the epoch restart: "
                                            "mmengine's 2 s pause + new workers)"),
        ("eval hook (last iteration)", f"{r['eval_hook_s']:.0f} s" if r["eval_hook_s"] is not None else "?"),
        ("train process", f"{r['train_process_s']:.0f} s, peak RSS {r['train_peak_rss_gib']:.1f} GiB"),
        ("trainable parameters", f"LoRA {r['trainable']['lora'] / 1e6:.1f} M, connector "
                                 f"{r['trainable']['connector'] / 1e6:.2f} M, other {r['trainable']['other'] / 1e6:.1f} M"),
        ("export (pth_to_hf)", f"{r['export_s']:.0f} s, {r['export_gb']:.2f} GB, peak RSS "
                               f"{r['export_peak_rss_gib']:.1f} GiB"),
        ("xtuner-vitask eval", f"{r['eval_n']} samples, {r['eval_cli_s']:.0f} s, peak RSS {r['eval_peak_rss_gib']:.1f} GiB"),
    ]
    if r["extra_cfg_options"]:
        rows.insert(2, ("extra --cfg-options", " ".join(r["extra_cfg_options"])))
    print("\n| dry run | measured |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nexport: {', '.join(r['export_files'])}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DryRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
