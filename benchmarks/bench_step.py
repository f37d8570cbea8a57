"""Step cost of VITask vs the vanilla recipe at InternVL2-2B's token proportions, shared prefix on and off.

One process, one batch of a generated DermaMNIST-layout set converted by ``data_tools`` (the contract's
instruction and responses), prompts built by the project's dataset with InternVL2-2B's chat template
(``internlm2-chat``, InternVL's system message) and 256 image tokens per 448 px tile. On it, one
training step (forward + backward + grad clip + AdamW step) of each variant:

- ``vanilla``: the ``InternVL2`` wrapper (XTuner's LoRA recipe), eq. 1;
- ``stage1`` / ``stage2``: ``VITaskInternVL`` (EP_cls, RDA; stage 2: connector frozen + CRT), each with
  ``shared_prefix`` off (one full LLM pass per sequence: the reference) and on (models/shared_prefix.py).

Exemplars are cached TSM features (random, size 768 as ViT-B/16's): the TSM never runs in the step.

Time: variants interleaved round by round (rotating order) after warm-up rounds; ``time_x`` is the
median over rounds of (variant step / vanilla step of the same round), which cancels slow changes of
machine load. Each round also times the frozen ViT encoding the batch alone: its share ``V`` of the
vanilla step gives the floor of a variant, ``V + (1 - V) * llm_tokens_x`` (the LLM's cost taken as
proportional to the tokens it processes).

Memory: peak = resident tensors (weights, buffers, optimizer state) + the step's peak of newly allocated
tensor bytes. On CPU the second comes from ``torch.profiler``'s allocator trace (``profile_memory``; the
CPU counterpart of ``torch.cuda.max_memory_allocated``, which ``--device cuda`` uses).

    python benchmarks/bench_step.py                 # scaled-down InternVL2 at 2B's token proportions (CPU)
    python benchmarks/bench_step.py --quick         # small model, few repeats: checks the plumbing
    python benchmarks/bench_step.py --model-path work_dirs/internvl2_2b_random --device cuda \\
        --activation-checkpointing --json rows.json # the same table for InternVL2-2B's shape on a GPU

On CPU the model is built here (``xtuner_vitask.testing``): InternVL2-2B's LLM code (InternLM2 remote code:
eager attention, legacy caches), chat template and 256 image tokens per 448 px tile, with narrow, shallow
towers sized so that the frozen ViT's share of the vanilla step is near InternVL2-2B's (see ``FULL``).
"""
from __future__ import annotations

import os

# before torch is imported: one OpenMP pool sized by --threads, not by the machine's core count
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (CPU peak memory) is quiet

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from xtuner_vitask.logs import quiet_mmengine  # noqa: E402

GOALS = {("stage1", True): dict(time_x=1.3), ("stage2", True): dict(time_x=2.3, peak_x=2.1)}
EXEMPLAR_DIM = 768  # ViT-B/16's feature size (the paper's TSM)
# InternLM2's tokenizer is not available offline; InternVL's system message is about 30 of its tokens
# (an estimate: 59 characters, ~1.5 Chinese characters per token). A small test tokenizer's count is far
# off either way, so with one the message is cut or repeated to this many tokens (InternVL2-2B's proportions).
SYSTEM_TOKENS_ESTIMATE = 32
SMALL_VOCAB = 10_000

# CPU sizes: InternVL2-2B's LLM code, chat template and 256 image tokens per 448 px tile, with narrow, shallow
# towers. Kept from InternVL2-2B is what the ratios depend on: the token layout, the frozen ViT's share of the
# vanilla step, and a step dominated by the LLM's matmuls rather than its attention. InternVL2-2B by FLOPs:
# InternViT-300M forward on 1025 tokens ~0.72 TF, InternLM2-1.8B forward + LoRA backward on ~366 tokens
# ~2.3 TF (attention ~3% of it), so the ViT is ~24% of a step (~18% with activation checkpointing's
# recompute). A narrow model is attention-heavy on CPU (eager attention is O(L^2 h) against O(L h^2) for
# the matmuls), so the LLM here is 512 wide with 2 layers; and a narrow ViT at 448 px / patch 14 (1025
# tokens) is attention-bound too, so it sees 16 x 16 patches of 28 px without pixel shuffle -- the same 256
# tokens reach the LLM: the ViT measured ~23% of the vanilla step.
FULL = dict(vlm=dict(image_size=448, patch_size=28, downsample_ratio=1.0, vision_hidden=448, llm_hidden=512,
                     num_layers=2), repeats=15, warmup=3)
QUICK = dict(vlm=dict(image_size=112, patch_size=14, vision_hidden=32, llm_hidden=64, num_layers=2),
             repeats=3, warmup=1)


# ---------------------------------------------------------------------------- fixtures
def build_data(workdir: Path, n_train: int, seed: int = 0) -> str:
    """A generated DermaMNIST-layout set in the data contract (converter's instruction and responses)."""
    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    npz = write_medmnist_npz(workdir / "dermamnist.npz", "dermamnist", n_per_split=(n_train, 8, 8), size=28, seed=seed)
    return str(convert_medmnist("dermamnist", 28, workdir / "dermamnist", npz_path=npz, progress=False))


def build_model_folder(workdir: Path, sizes: dict, seed: int = 0) -> str:
    from xtuner_vitask.testing import build_tiny_internvl

    return str(build_tiny_internvl(workdir / "internvl2_2b_shaped", llm="internlm2", seed=seed, **sizes["vlm"]))


def system_message(tokenizer, default: str, n_tokens) -> tuple[str, int]:
    """The template's system message with ``n_tokens`` tokens of this tokenizer ('auto': for a small test
    tokenizer only, InternLM2's estimated count), and its token count.

    A test tokenizer splits InternVL's system message into far more or far fewer tokens than InternLM2's
    (its vocabulary is a thousand pieces): the message is cut to, or repeated up to, the count instead.
    """
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if n_tokens == "auto":
        n_tokens = SYSTEM_TOKENS_ESTIMATE if len(tokenizer) < SMALL_VOCAB else None
    if n_tokens is None:
        return default, count(default)
    text = default * (n_tokens // max(1, count(default)) + 1)
    lo, hi = 0, len(text)  # the longest prefix within n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(text[:mid]) <= n_tokens else (lo, mid - 1)
    return text[:lo], count(text[:lo])


def build_batch(model_path: str, data: str, batch_size: int, system_tokens, device, seed: int = 0):
    """``batch_size`` samples collated as training does, with cached CLS exemplars; and the prompt layout."""
    from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn
    from xtuner_vitask.datasets.templates import chat_template
    from xtuner_vitask.internvl_config import load_internvl_config
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    template = chat_template(load_internvl_config(model_path).template)
    system, n_system = system_message(tokenizer, template.DEFAULT_SYSTEM, system_tokens)
    ds = VITaskDataset(model_path, f"{data}/train.jsonl", tsm_img_size=32, max_length=4096, seed=seed, system=system)
    batch = vitask_collate_fn([ds[i] for i in range(batch_size)])["data"]
    g = torch.Generator().manual_seed(seed)
    batch["exemplars"] = torch.randn(batch_size, EXEMPLAR_DIM, generator=g)
    batch.pop("tsm_pixel_values", None)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    image_token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    extra_negatives = 0 if batch["neg_pixel_values"] is None else len(batch["neg_pixel_values"])
    return batch, dict(system_text_tokens=n_system, extra_negative_images=extra_negatives,
                       **prompt_layout(batch, image_token))


def prompt_layout(batch, img_context_token_id) -> dict:
    """Mean tokens per sample: before the image, image, after the image up to the response, response."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    image = ids == img_context_token_id
    pos = torch.arange(ids.shape[1], device=ids.device)
    first = torch.where(image, pos, ids.shape[1]).amin(1)
    last = torch.where(image, pos, -1).amax(1) + 1
    response = (labels != -100).sum(1)
    length = mask.sum(1)
    mean = lambda t: round(float(t.float().mean()), 1)  # noqa: E731
    return dict(tokens_before_image=mean(first), image_tokens=mean(last - first),
                tokens_after_image=mean(length - last - response), response_tokens=mean(response),
                sequence_tokens=mean(length), padded_length=int(ids.shape[1]))


def default_attention(model_path, cuda):
    """flash-attention 2 where it imports and CUDA runs; else SDPA, or eager for InternLM2 (no SDPA there)."""
    import importlib.util

    from xtuner_vitask.internvl_config import load_internvl_config

    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "eager" if load_internvl_config(model_path).llm_config.model_type == "internlm2" else "sdpa"


def lora_config(model_path):
    from peft import LoraConfig

    from xtuner_vitask.internvl_config import load_internvl_config

    llm = load_internvl_config(model_path).llm_config.model_type
    targets = (["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
               if llm == "internlm2" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # InternVL's own LoRA recipe (r 16, alpha 32 as the tiny configs); the head stays frozen
    return dict(type=LoraConfig, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def build_models(model_path: str, device, dtype, attn, checkpointing: bool, seed: int = 0) -> dict:
    """The vanilla recipe's InternVL2 and two VITaskInternVL (stage 1, stage 2)."""
    from xtuner_vitask.models import InternVL2, VITaskInternVL

    common = dict(freeze_llm=True, freeze_visual_encoder=True, freeze_mlp1=True, attn_implementation=attn,
                  torch_dtype=dtype, activation_checkpointing=checkpointing, llm_lora=lora_config(model_path))
    torch.manual_seed(seed)
    models = {"vanilla": InternVL2(model_path, **common)}
    for stage in (1, 2):
        torch.manual_seed(seed)
        model = VITaskInternVL(model_path, exemplar_dim=EXEMPLAR_DIM, alpha=1.0, beta=1.0, **common)
        model.set_stage(stage)
        models[f"stage{stage}"] = model
    return {name: m.to(device).train() for name, m in models.items()}


# ---------------------------------------------------------------------------- one step
@dataclass
class Variant:
    variant: str  # vanilla | stage1 | stage2
    shared_prefix: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: list = field(default_factory=list)

    @property
    def name(self):
        return self.variant if self.variant == "vanilla" else f"{self.variant}, shared prefix {'on' if self.shared_prefix else 'off'}"


class Runner:
    def __init__(self, batch, device):
        self.batch, self.device = batch, torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):  # AmpOptimWrapper(dtype='bfloat16') as the InternVL2 recipes on GPUs
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def step(self, v: Variant, zero_grad=True):
        """forward + backward + grad clip + optimizer step, as mmengine's OptimWrapper does it."""
        if zero_grad:
            v.optimizer.zero_grad(set_to_none=True)
        if v.variant != "vanilla":
            v.model.shared_prefix = v.shared_prefix
        with self.autocast():
            total, _ = v.model.parse_losses(v.model(self.batch))
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in v.optimizer.param_groups for p in g["params"]], max_norm=1.0)
        v.optimizer.step()

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def encode_images(self, model):
        """The frozen ViT on the batch's images, alone (forward only, as in every step)."""
        with torch.no_grad(), self.autocast():
            model.encode_images(model.stack_tiles(self.batch["pixel_values"]))

    def step_peak_bytes(self, v: Variant) -> int:
        """Peak tensor bytes allocated above the step's start."""
        v.optimizer.zero_grad(set_to_none=True)  # free the last step's gradients first
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step(v, zero_grad=False)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        return cpu_step_peak_bytes(lambda: self.step(v, zero_grad=False))


def cpu_step_peak_bytes(fn) -> int:
    """From the profiler's allocator trace: the running total of CPU tensor bytes allocated while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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


@contextlib.contextmanager
def work_counter(model):
    """Tokens through the LLM decoder (batch x length of every call) and images through the ViT while the
    block runs."""
    counts = {"llm_tokens": 0, "vit_images": 0}
    decoder, _ = model.decoder_and_head()

    def on_llm(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        counts["llm_tokens"] += (embeds if embeds is not None else args[0]).shape[:2].numel()

    def on_vit(module, args, kwargs):
        counts["vit_images"] += kwargs.get("pixel_values", args[0] if args else None).shape[0]

    handles = [decoder.register_forward_pre_hook(on_llm, with_kwargs=True),
               model.model.vision_model.register_forward_pre_hook(on_vit, with_kwargs=True)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


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


# ---------------------------------------------------------------------------- the benchmark
def run_benchmark(quick=False, repeats=None, warmup=None, threads=1, batch_size=4, workdir=None, seed=0,
                  model_path=None, device="cpu", attn=None, activation_checkpointing=False, system_tokens="auto",
                  progress=True) -> dict:
    sizes = QUICK if quick else FULL
    repeats = repeats or sizes["repeats"]
    warmup = sizes["warmup"] if warmup is None else warmup
    torch.set_num_threads(threads)
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        from xtuner_vitask.errors import VITaskError

        raise VITaskError("--device cuda but torch sees no CUDA device: install the GPU build (install.sh --gpu)")
    dtype = "bfloat16" if cuda else "float32"
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_step_"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), quiet_mmengine():
            warnings.simplefilter("ignore")
            data = build_data(workdir, n_train=max(64, batch_size), seed=seed)
            built = model_path is None
            if built:
                model_path = build_model_folder(workdir, sizes, seed)
            attn = attn or default_attention(model_path, cuda)
            batch, layout = build_batch(model_path, data, batch_size, system_tokens, device, seed)
            models = build_models(model_path, device, dtype, attn, activation_checkpointing, seed)
        from xtuner_vitask.models.shared_prefix import layout as shared_layout

        vitask = models["stage1"]
        bounds = shared_layout(batch["input_ids"], vitask.exemplar_spans(batch["input_ids"]), batch["labels"],
                               vitask.model.img_context_token_id)
        layout.update(zip(("root_end", "trunk_end"), bounds) if isinstance(bounds, tuple) else [("no_sharing", bounds)])
        optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                                              weight_decay=0.0) for name, m in models.items()}
        variants = [Variant("vanilla", False, models["vanilla"], optimizers["vanilla"])]
        for stage in ("stage1", "stage2"):
            for shared in (False, True):
                variants.append(Variant(stage, shared, models[stage], optimizers[stage]))
        runner = Runner(batch, device)

        counts = {}
        for v in variants:  # first step: LLM tokens and ViT images (and lazy init of the optimizer state)
            with work_counter(v.model) as c:
                runner.step(v)
            counts[v.name] = c

        from tqdm import tqdm

        vit_times = []
        for r in tqdm(range(warmup + repeats), desc="rounds", disable=not progress):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no fixed position
            for v in order:
                elapsed = runner.timed(lambda: runner.step(v))
                if r >= warmup:
                    v.times.append(elapsed)
            if r >= warmup:
                vit_times.append(runner.timed(lambda: runner.encode_images(models["vanilla"])))

        rows = []
        for v in variants:
            transient = runner.step_peak_bytes(v)
            resident = resident_bytes(v)
            rows.append(dict(variant=v.variant, shared_prefix=v.shared_prefix, name=v.name,
                             step_ms=1e3 * statistics.median(v.times), step_ms_iqr=_iqr_ms(v.times),
                             resident_mb=resident / 2**20, transient_mb=transient / 2**20,
                             peak_mb=(resident + transient) / 2**20, **counts[v.name]))
    vanilla = variants[0]
    vit_share = statistics.median(t / t0 for t, t0 in zip(vit_times, vanilla.times))
    setup = dict(quick=quick, repeats=repeats, warmup=warmup, threads=threads, batch_size=batch_size,
                 device=device, dtype=dtype, attn_implementation=llm_attention(models["vanilla"]),
                 activation_checkpointing=activation_checkpointing, torch=torch.__version__, vit_share=vit_share,
                 **(dict(vlm=sizes["vlm"]) if built else dict(model_path=model_path)), **layout)
    base = rows[0]
    for row, v in zip(rows, variants):
        # paired per round (same moment, same machine load), then the median: steadier than a ratio of medians
        row["time_x"] = statistics.median(t / t0 for t, t0 in zip(v.times, vanilla.times))
        row["peak_x"] = row["peak_mb"] / base["peak_mb"]
        row["transient_x"] = row["transient_mb"] / base["transient_mb"]
        row["llm_tokens_x"] = row["llm_tokens"] / base["llm_tokens"]
        row["floor_x"] = vit_share + (1 - vit_share) * row["llm_tokens_x"]
        goals = GOALS.get((row["variant"], row["shared_prefix"]), {})
        row["goals"] = goals
        row["meets_goals"] = all(row[k] <= limit for k, limit in goals.items()) if goals else None
    return dict(setup=setup, rows=rows)


def llm_attention(model):
    """The attention the LLM runs (InternLM2's remote code knows eager and flash only)."""
    config = model.model.language_model.config
    return getattr(config, "attn_implementation", None) if config.model_type == "internlm2" else config._attn_implementation


def _iqr_ms(times):
    if len(times) < 4:
        return 0.0
    q = statistics.quantiles(times, n=4)
    return 1e3 * (q[2] - q[0])


def format_table(result: dict) -> str:
    """The markdown table of ratios to the vanilla step."""
    s = result["setup"]
    if "vlm" in s:
        v = s["vlm"]
        model = (f"InternVL2 built here: InternLM2 LLM hidden {v['llm_hidden']} x {v['num_layers']} layers, InternViT "
                 f"hidden {v['vision_hidden']} x {v['num_layers']} layers, {v['image_size']} px / patch "
                 f"{v['patch_size']} / pixel shuffle {v.get('downsample_ratio', 0.5)}, internlm2-chat template")
    else:
        model = f"model {s['model_path']}"
    lines = [
        f"{model}; batch {s['batch_size']}; per sample {s['tokens_before_image']:g} tokens before the image "
        f"(system text {s['system_text_tokens']}), {s['image_tokens']:g} image tokens, {s['tokens_after_image']:g} "
        f"after it, {s['response_tokens']:g} response tokens ({s['sequence_tokens']:g} in all, padded to "
        f"{s['padded_length']}); {s['device']} {s['dtype']}, attention {s['attn_implementation']}, activation "
        f"checkpointing {'on' if s['activation_checkpointing'] else 'off'}, LoRA r16, torch {s['torch']}, "
        f"{s['threads']} thread(s); median of {s['repeats']} interleaved rounds after {s['warmup']} warm-up (time x = "
        f"median of per-round ratios; ± = half the interquartile range). The frozen ViT is {100 * s['vit_share']:.0f}% "
        "of the vanilla step (V); floor x = V + (1 - V) x LLM tokens x.",
        "",
        "| variant | shared prefix | step ms | time x vanilla | floor x | LLM tokens x | peak MB | peak x | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        goal = ", ".join(f"{k.split('_')[0]} <= {x:g}x" for k, x in r["goals"].items())
        if goal:
            goal += " ok" if r["meets_goals"] else " MISSED"
        shared = "" if r["variant"] == "vanilla" else ("on" if r["shared_prefix"] else "off")
        lines.append(f"| {r['variant']} | {shared} | {r['step_ms']:.1f} ± {r['step_ms_iqr'] / 2:.1f} | "
                     f"{r['time_x']:.2f}x | {r['floor_x']:.2f}x | {r['llm_tokens_x']:.2f}x | {r['peak_mb']:.1f} | "
                     f"{r['peak_x']:.2f}x | {goal} |")
    return "\n".join(lines)


def _write(path, text):
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats: checks the plumbing")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 15, quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]),
                        help="torch CPU threads (default: $OMP_NUM_THREADS, else 1 -- steadier on a shared CPU)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model-path", help="an InternVL2 checkpoint folder (e.g. make-tiny --preset internvl2-2b, "
                                             "or InternVL2-2B itself); default: a scaled-down model built here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 weights and autocast as the GPU recipes, torch.cuda peak memory")
    parser.add_argument("--attn", choices=["auto", "eager", "sdpa", "flash_attention_2"],
                        help="attention implementation (default: flash_attention_2 on CUDA where flash-attn "
                             "imports, else sdpa; InternLM2 has eager instead of sdpa)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="as the GPU recipes (default off)")
    parser.add_argument("--system-tokens", default="auto",
                        help="cut or repeat the system message to N tokens; 'auto' (default): to InternLM2's "
                             f"estimated {SYSTEM_TOKENS_ESTIMATE} for a small test tokenizer only; 'none': never")
    parser.add_argument("--workdir", help="folder for the generated model and data (default: temporary)")
    parser.add_argument("--json", help="also write the setup and rows as JSON here")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    system_tokens = {"auto": "auto", "none": None}.get(args.system_tokens)
    if system_tokens is None and args.system_tokens != "none":
        system_tokens = int(args.system_tokens)
    result = run_benchmark(quick=args.quick, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                           batch_size=args.batch_size, workdir=args.workdir, model_path=args.model_path,
                           device=args.device, attn=args.attn, activation_checkpointing=args.activation_checkpointing,
                           system_tokens=system_tokens)
    table = format_table(result)
    print(table)
    if args.json:
        _write(args.json, json.dumps(result, indent=2))
    if args.out:
        _write(args.out, table + "\n")
    missed = [r["name"] for r in result["rows"] if r["meets_goals"] is False]
    if missed:
        print(f"goal missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
