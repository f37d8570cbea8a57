"""Step cost of VITask vs the vanilla recipe: time and peak memory, side by side, same batch.

One process builds a tiny InternVL2 (``xtuner_vitask.testing``), a tiny timm TSM (random weights,
saved as a real TSM checkpoint), a generated DermaMNIST-layout set, and an exemplar cache of it.
Then, on the same 8 samples, it runs one training step (forward + backward + grad clip + AdamW step)
of each variant:

- ``vanilla``:           the ``InternVL2`` wrapper (the vanilla LoRA recipe's model), eq. 1;
- ``stage 1 (TSM)``:     ``VITaskInternVL`` stage 1, TSM run in the loop on the batch's TSM pixels;
- ``stage 1 (cache)``:   the same model, the batch carries cached exemplars (no TSM forward);
- ``stage 2 (TSM)`` / ``stage 2 (cache)``: stage 2 (connector frozen, + CRT negative pass);
- ``stage 2 (cache, one-class batch)``: the worst case for the ViT: 8 samples of one class, so no
  negative comes from the batch and every one is an extra image to encode (other samples, same
  instruction, similar length; its ratio is still to the vanilla step of the main batch).

Time: the variants are interleaved round by round (rotating order) after warm-up rounds; the
table gives the median step over ``--repeats`` rounds and, as the ratio, the median over rounds of
(variant step / vanilla step of the same round), which cancels slow changes of machine load.
torch runs on ``--threads`` threads (default 1: steadier when other work shares the CPU).

Memory: on CPU, torch tensors are allocated by c10's allocator, which ``tracemalloc`` does not see,
and the process RSS mixes in the Python heap, shared libraries and glibc's caching. The honest
CPU counterpart of ``torch.cuda.max_memory_allocated`` is the profiler's allocator trace:
``torch.profiler`` with ``profile_memory=True`` records every tensor allocation and free with the
running total, so one profiled step gives the exact peak of tensor bytes allocated above the
step's start (activations, gradients, temporaries). Added to the resident tensors (weights, buffers,
optimizer state) it gives the step's peak. Both are reported; the transient part is what EP and
CRT add to.

Counts (forward pre-hooks, one un-timed step per variant): TSM forwards and images per step
(0 with the cache), images through the VLM's ViT vs distinct images the step needs (positives plus
CRT negatives not already in the batch), and LLM decoder passes (floor: 1 vanilla, 2 stage 1,
3 stage 2), counted as sequences through the decoder per batch sample.

    python benchmarks/bench_step.py            # llm_hidden 256, 4 layers, 224 px / patch 14 (~5 min, 1 thread)
    python benchmarks/bench_step.py --quick    # small model, few repeats (< 1 min): checks the plumbing
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GOALS = {"stage 1": 2.05, "stage 2": 3.1}
EXTRA_NEGATIVES = "stage 2 (cache, one-class batch)"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# model sizes: the full run makes ViT and LLM matmuls dominate Python overhead on a CPU
FULL = dict(vlm=dict(image_size=224, patch_size=14, vision_hidden=128, llm_hidden=256, num_layers=4),
            tsm=dict(model_name="vit_tiny_patch16_224", img_size=224, model_kwargs=dict(patch_size=16, depth=2)),
            repeats=15, warmup=3)
QUICK = dict(vlm=dict(image_size=56, patch_size=14, vision_hidden=32, llm_hidden=64, num_layers=2),
             tsm=dict(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(patch_size=4, depth=1)),
             repeats=3, warmup=1)


# ---------------------------------------------------------------------------- fixtures
def build_fixtures(workdir: Path, sizes: dict, n_train: int = 64, seed: int = 0) -> dict:
    """Tiny InternVL2, generated data, a tiny TSM checkpoint and its exemplar cache under ``workdir``."""
    from mmengine.config import Config

    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.tsm.exemplar_cache import build_exemplar_cache
    from xtuner_vitask.tsm.checkpoint import load_tsm
    from xtuner_vitask.tsm.model import TaskSpecificModel
    from xtuner_vitask.testing import build_tiny_internvl
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    model_path = str(build_tiny_internvl(workdir / "tiny_internvl2", llm="qwen2", seed=seed, **sizes["vlm"]))
    npz = write_medmnist_npz(workdir / "dermamnist.npz", "dermamnist", n_per_split=(n_train, 8, 8), size=28, seed=seed)
    data = Path(convert_medmnist("dermamnist", 28, workdir / "dermamnist", npz_path=npz, progress=False))
    num_classes = len(json.loads((data / "meta.json").read_text())["label_names"])

    # a TSM checkpoint in the layout `xtuner train` writes (weights are random: cost, not accuracy)
    tsm_cfg = Config(dict(model=dict(type=TaskSpecificModel, num_classes=num_classes, task_type="multi-class",
                                     pretrained=False, **sizes["tsm"])))
    torch.manual_seed(seed)
    tsm_model = TaskSpecificModel(**{k: v for k, v in tsm_cfg.model.items() if k != "type"})
    tsm_ckpt = workdir / "tsm.pth"
    torch.save({"state_dict": tsm_model.state_dict(), "meta": {}}, tsm_ckpt)
    cache = workdir / "exemplars_cls.pt"
    build_exemplar_cache(load_tsm(str(tsm_ckpt), config=tsm_cfg), [str(data / "train.jsonl")], str(cache),
                         kind="cls", progress=False)
    return dict(model_path=model_path, data=str(data), tsm_checkpoint=str(tsm_ckpt), tsm_config=tsm_cfg,
                cache=str(cache))


def lora_config():
    from peft import LoraConfig

    # the tiny recipes' LoRA (configs/internvl2_tiny_cpu_lora.py, configs/vitask_tiny_cpu.py)
    return dict(type=LoraConfig, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                modules_to_save=["lm_head"], task_type="CAUSAL_LM")


def build_models(fx: dict, seed: int = 0) -> dict:
    """The vanilla recipe's InternVL2 and two VITaskInternVL (stage 1, stage 2), TSM attached to both."""
    from xtuner_vitask.models import InternVL2, VITaskInternVL

    common = dict(freeze_llm=True, freeze_visual_encoder=True, freeze_mlp1=True, attn_implementation="sdpa",
                  torch_dtype="float32", activation_checkpointing=False)
    torch.manual_seed(seed)
    vanilla = InternVL2(fx["model_path"], llm_lora=lora_config(), **common)
    vitask = {}
    for stage in (1, 2):
        torch.manual_seed(seed)
        model = VITaskInternVL(fx["model_path"], llm_lora=lora_config(), alpha=1.0, beta=1.0,
                               tsm=dict(checkpoint=fx["tsm_checkpoint"], config=fx["tsm_config"],
                                        meta=f"{fx['data']}/meta.json"), **common)
        model.set_stage(stage)
        vitask[stage] = model
    return {"vanilla": vanilla, "stage 1": vitask[1], "stage 2": vitask[2]}


def build_batches(fx: dict, batch_size: int, seed: int = 0):
    """The same samples collated twice: with TSM pixels (TSM in the loop) and with cached exemplars."""
    from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn

    common = dict(tsm_checkpoint=fx["tsm_checkpoint"], max_length=512, seed=seed)
    with_tsm = VITaskDataset(fx["model_path"], f"{fx['data']}/train.jsonl", **common)
    cached = VITaskDataset(fx["model_path"], f"{fx['data']}/train.jsonl", exemplar_cache=fx["cache"], **common)
    indices = list(range(batch_size))
    batch_tsm = vitask_collate_fn([with_tsm[i] for i in indices])["data"]
    batch_cache = vitask_collate_fn([cached[i] for i in indices])["data"]
    assert torch.equal(batch_tsm["input_ids"], batch_cache["input_ids"])
    distinct = distinct_images(with_tsm, indices, batch_tsm)
    # worst case for stage 2: one class in the batch, so every CRT negative is an extra image to encode
    common = max(set(cached.response_key), key=cached.response_key.count)
    one_class = [i for i in range(len(cached)) if cached.response_key[i] == common][:batch_size]
    batch_extra = vitask_collate_fn([cached[i] for i in one_class])["data"]
    distinct_extra = distinct_images(cached, one_class, batch_extra)
    return batch_tsm, batch_cache, distinct, batch_extra, distinct_extra


def distinct_images(dataset, indices, batch) -> dict:
    """Distinct image files a step needs: the positives (stage 1), plus the CRT negatives (stage 2)."""
    positives = {dataset.data[i]["image"] for i in indices}
    negatives = set()
    n_pos = len(indices)
    for k, neg in enumerate(batch["neg_image_index"].tolist()):
        source = indices[neg] if neg < n_pos else dataset.negative_index(indices[k])
        negatives.add(dataset.data[source]["image"])
    return {1: len(positives), 2: len(positives | negatives)}


# ---------------------------------------------------------------------------- one step
@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    batch: dict
    stage: int  # 0 = vanilla
    optimizer: torch.optim.Optimizer = None
    times: list = field(default_factory=list)


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)


def train_step(v: Variant, zero_grad=True):
    """forward + backward + grad clip + optimizer step, as mmengine's OptimWrapper does it."""
    if zero_grad:
        v.optimizer.zero_grad(set_to_none=True)
    total, _ = v.model.parse_losses(v.model(v.batch))
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in v.optimizer.param_groups for p in g["params"]], max_norm=1.0)
    v.optimizer.step()


@contextlib.contextmanager
def counters(model):
    """Count TSM forwards/images, VLM ViT images and LLM decoder passes while the block runs."""
    counts = {"tsm_forwards": 0, "tsm_images": 0, "vit_images": 0, "llm_sequences": 0}

    def on_tsm(module, args):
        counts["tsm_forwards"] += 1
        counts["tsm_images"] += args[0].shape[0]

    def on_vit(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        counts["vit_images"] += pixels.shape[0]

    def on_llm(module, args, kwargs):  # sequences through the decoder (passes may be batched together)
        embeds = kwargs.get("inputs_embeds")
        counts["llm_sequences"] += (embeds if embeds is not None else args[0]).shape[0]

    lm = model.model.language_model
    causal_lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    handles = [model.model.vision_model.register_forward_pre_hook(on_vit, with_kwargs=True),
               causal_lm.get_decoder().register_forward_pre_hook(on_llm, with_kwargs=True)]
    tsm = getattr(model, "tsm", None)
    if tsm is not None:  # every TSM forward (forward, extract_features) goes through its patch embedding
        handles.append(tsm.backbone.patch_embed.register_forward_pre_hook(on_tsm))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def resident_bytes(v: Variant) -> int:
    """Bytes of the tensors that live across steps: parameters, buffers, optimizer state (unique storages)."""
    seen, total = set(), 0
    tensors = list(v.model.parameters()) + list(v.model.buffers())
    tensors += [t for state in v.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def step_peak_bytes(v: Variant) -> int:
    """Peak tensor bytes allocated above the step's start, from the profiler's allocator trace."""
    from torch.profiler import ProfilerActivity, profile

    # free the last step's gradients first: the profiler cannot see frees of blocks allocated before it
    v.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(v, zero_grad=False)
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(trace)
    running = [e["args"]["Total Allocated"] for e in events
               if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0, *running])  # "Total Allocated" counts from the profiler's start


# ---------------------------------------------------------------------------- the benchmark
def run_benchmark(quick=False, repeats=None, warmup=None, threads=1, batch_size=8, workdir=None, seed=0,
                  progress=True) -> dict:
    sizes = QUICK if quick else FULL
    repeats = repeats or sizes["repeats"]
    warmup = sizes["warmup"] if warmup is None else warmup
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_step_"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), _quiet_mmengine():
            warnings.simplefilter("ignore")
            fx = build_fixtures(workdir, sizes, n_train=max(64, batch_size), seed=seed)
            models = build_models(fx, seed)
            batch_tsm, batch_cache, distinct, batch_extra, distinct_extra = build_batches(fx, batch_size, seed)
        for m in models.values():
            m.train()
        optimizers = {name: make_optimizer(m) for name, m in models.items()}
        variants = [Variant("vanilla", models["vanilla"], batch_cache, 0)]
        for stage in (1, 2):
            for kind, batch in (("TSM", batch_tsm), ("cache", batch_cache)):
                variants.append(Variant(f"stage {stage} ({kind})", models[f"stage {stage}"], batch, stage))
        variants.append(Variant(EXTRA_NEGATIVES, models["stage 2"], batch_extra, 2))
        for v in variants:
            v.optimizer = optimizers["vanilla" if v.stage == 0 else f"stage {v.stage}"]

        counts = {}
        for v in variants:  # first step: counts (and lazy init of the optimizer state)
            with counters(v.model) as c:
                train_step(v)
            counts[v.name] = c

        from tqdm import tqdm

        for r in tqdm(range(warmup + repeats), desc="rounds", disable=not progress):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no fixed position
            for v in order:
                start = time.perf_counter()
                train_step(v)
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    v.times.append(elapsed)

        rows = []
        for v in variants:
            transient = step_peak_bytes(v)
            resident = resident_bytes(v)
            rows.append(dict(variant=v.name, stage=v.stage, step_ms=1e3 * statistics.median(v.times),
                             step_ms_iqr=_iqr_ms(v.times), resident_mb=resident / 2**20,
                             transient_mb=transient / 2**20, peak_mb=(resident + transient) / 2**20,
                             distinct_images=(distinct_extra if v.name == EXTRA_NEGATIVES else distinct)[
                                 2 if v.stage == 2 else 1], **counts[v.name]))
    setup = dict(quick=quick, repeats=repeats, warmup=warmup, threads=threads, batch_size=batch_size,
                 vlm=sizes["vlm"], tsm=sizes["tsm"], torch=torch.__version__,
                 seq_len=int(batch_cache["attention_mask"].shape[1]))
    base = rows[0]
    for row, v in zip(rows, variants):
        # paired per round (same moment, same machine load), then the median: steadier than a ratio of medians
        row["time_x"] = statistics.median(t / t0 for t, t0 in zip(v.times, variants[0].times))
        row["peak_x"] = row["peak_mb"] / base["peak_mb"]
        row["transient_x"] = row["transient_mb"] / base["transient_mb"]
        row["llm_passes"] = row["llm_sequences"] / setup["batch_size"]
        goal = GOALS.get(row["variant"].split(" (")[0])
        row["goal_x"] = goal
        row["meets_goal"] = None if goal is None else bool(row["time_x"] <= goal and
                                                            ("cache" not in row["variant"] or row["tsm_forwards"] == 0))
    return dict(setup=setup, rows=rows)


@contextlib.contextmanager
def _quiet_mmengine():
    """XTuner prints the whole model at INFO level: keep the benchmark's output to the table."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _iqr_ms(times):
    if len(times) < 4:
        return 0.0
    q = statistics.quantiles(times, n=4)
    return 1e3 * (q[2] - q[0])


def format_table(result: dict) -> str:
    """The markdown table of ratios to the vanilla step."""
    s = result["setup"]
    vlm = s["vlm"]
    lines = [
        f"Tiny InternVL2 (Qwen2 LLM hidden {vlm['llm_hidden']}, {vlm['num_layers']} layers; InternViT hidden "
        f"{vlm['vision_hidden']}, {vlm['num_layers']} layers, {vlm['image_size']} px / patch {vlm['patch_size']}), "
        f"batch {s['batch_size']} (padded length {s['seq_len']}), fp32, LoRA r16, torch {s['torch']} CPU, "
        f"{s['threads']} thread(s), median of {s['repeats']} interleaved rounds after {s['warmup']} warm-up "
        "(time x = median of per-round ratios; ± = half the interquartile range).",
        "",
        "| variant | step ms (median) | time x vanilla | goal | peak MB | peak x | step transient MB | transient x "
        "| TSM fwd/step | ViT images/step | distinct images | LLM passes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        goal = "" if r["goal_x"] is None else f"<= {r['goal_x']:.2f}x {'ok' if r['meets_goal'] else 'MISSED'}"
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.1f} ± {r['step_ms_iqr'] / 2:.1f} | {r['time_x']:.2f}x | {goal} "
            f"| {r['peak_mb']:.1f} | {r['peak_x']:.2f}x | {r['transient_mb']:.1f} | {r['transient_x']:.2f}x "
            f"| {r['tsm_forwards']} ({r['tsm_images']} img) | {r['vit_images']} | {r['distinct_images']} "
            f"| {r['llm_passes']:g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats (< 1 min)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 15, quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", help="folder for the tiny model, data, TSM and cache (default: temporary)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    result = run_benchmark(quick=args.quick, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                           batch_size=args.batch_size, workdir=args.workdir)
    table = format_table(result)
    print(table)
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.out, table + "\n")):
        if path:
            tmp = f"{path}.tmp"
            Path(tmp).write_text(text)
            os.replace(tmp, path)
    missed = [r["variant"] for r in result["rows"] if r["meets_goal"] is False]
    if missed:
        print(f"goal missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
