"""Training memory of ``configs/vitask_internvl2_2b_derma.py`` at InternVL2-2B size: measured on CPU, extrapolated
to a GPU step (batch 8, ~370 tokens) with stated arithmetic.

    python benchmarks/activation_memory.py --cache ~/.cache/xtuner_vitask [--tokens 128,256,384,512] [--json OUT]

What is MEASURED (on the ``--size small`` preset of ``dry_run_2b.py``: InternVL2-2B's exact widths, 2 ViT + 2 LLM
layers, built by the 2B config's own model dict as on a GPU -- bf16 load, peft's fp32 upcast of the LoRA'd LLM,
LoRA r=128 -- and run under ``torch.autocast(bfloat16)`` as AmpOptimWrapper runs it, eager attention):

- activation bytes = bytes of the tensors autograd saves for backward (``saved_tensors_hooks``; storages counted
  once, parameters excluded), with the LLM's activation checkpointing on and off;
- per LLM layer = (2 layers) - (1 layer), the rest = what does not depend on depth; per token from a fit
  ``a + b T + c T^2`` over several sequence lengths T of one LLM pass (c: eager attention's T x T weights);
- a whole VITask step at batch 1 on a real sample (vanilla forward, stage 1, stage 2 incl. the CRT negative);
- bytes per parameter of each part (frozen LLM/ViT, LoRA, connector, TSM) and per-layer parameter counts.

What is COMPUTED: 24 layers, batch 8, T tokens per sample, 1/2/3 LLM passes kept for one backward (vanilla /
stage 1 / stage 2); with checkpointing, backward recomputes one layer at a time (+ one layer's activations for
the batch); AdamW (two fp32 moments) + fp32 gradients for the trainable parameters; flash-attention = eager
minus the measured T^2 term; a fixed reserve for the CUDA context and allocator (``--reserve-gib``).
"""
import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dry_run_2b  # noqa: E402  (the preset, data and tiny TSM of the dry run)

GIB = 2**30


# ------------------------------------------------------------------------------------------- counting
@contextmanager
def saved_bytes(model):
    """Bytes of the tensors autograd saves inside the block (each storage once, parameters/buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, total = set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if storage.data_ptr() not in own and key not in seen and storage.device.type != "meta":
            seen.add(key)
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def llm_decoder(model):
    decoder, _ = model.decoder_and_head()
    return decoder


@contextmanager
def llm_layers(model, n):
    decoder = llm_decoder(model)
    full = decoder.layers
    decoder.layers = full[:n]
    try:
        yield
    finally:
        decoder.layers = full


def set_checkpointing(model, on):
    if on:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------- measuring
def one_pass(model, tokens, response=6):
    """Saved bytes of one LLM pass (decoder + LM head on the response rows) over T random embeddings."""
    hidden = llm_decoder(model).config.hidden_size
    torch.manual_seed(0)
    embeds = torch.randn(1, tokens, hidden, dtype=torch.bfloat16).requires_grad_()  # as enable_input_require_grads
    mask = torch.ones(1, tokens, dtype=torch.bool)
    positions = torch.arange(tokens)[None]
    labels = torch.full((1, tokens), -100)
    labels[0, -response:] = 1
    with autocast(), saved_bytes(model) as total:
        model.response_logits(embeds, mask, positions, labels)
    return total[0]


def step_terms(model, batch, stage):
    """Saved bytes of one training forward at ``stage`` (0 = the vanilla recipe's forward)."""
    from xtuner_vitask.models.internvl import InternVL2

    with autocast(), saved_bytes(model) as total:
        if stage == 0:
            InternVL2.forward(model, batch)
        else:
            model.set_stage(stage)
            model.compute_losses(batch)
    return total[0]


def parameter_bytes(model):
    """{part: {"params", "bytes", "trainable", "per_layer_params"}} of the built model."""
    parts = {}
    for name, p in model.named_parameters():
        part = ("lora" if "lora_" in name else "connector" if name.startswith("connector.")
                else "tsm" if name.startswith("tsm.") else "vit" if ".vision_model." in name
                else "mlp1" if ".mlp1." in name else "llm")
        d = parts.setdefault(part, {"params": 0, "bytes": 0, "trainable": 0, "layer0_params": 0, "dtypes": set()})
        d["params"] += p.numel()
        d["bytes"] += p.numel() * p.element_size()
        d["trainable"] += p.numel() if p.requires_grad else 0
        d["dtypes"].add(str(p.dtype).replace("torch.", ""))
        if (".layers.0." in name and part in ("llm", "lora")) or (".encoder.layers.0." in name and part == "vit"):
            d["layer0_params"] += p.numel()
    for d in parts.values():
        d["dtypes"] = sorted(d["dtypes"])
    return parts


def build(folder, data, tsm):
    """The 2B config's model dict, pointed at the preset (bf16 load as on a GPU; eager attention)."""
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    from xtuner_vitask.config_files import config_path

    cfg = Config.fromfile(config_path(dry_run_2b.CONFIG_NAME))
    cfg.model.update(model_path=str(folder), torch_dtype="bfloat16", attn_implementation="eager",
                     tsm=dict(checkpoint=str(tsm), config=None, meta=f"{data}/meta.json"))
    model = BUILDER.build(cfg.model)
    model.train()
    dataset_cfg = cfg.train_dataloader.dataset
    dataset_cfg.update(model_path=str(folder), data_paths=f"{data}/train.jsonl", tsm_checkpoint=str(tsm),
                       negatives=True)
    return model, BUILDER.build(dataset_cfg), cfg.model.llm_lora


def tsm_parameters(name="vit_base_patch16_224", num_classes=7):
    """Parameters of the paper's TSM (timm ViT-B/16, built on the meta device: nothing is downloaded)."""
    import timm

    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=num_classes).parameters())


def fit(tokens, values):
    """Least squares a + b T + c T^2; returns (a, b, c) and the largest relative residual."""
    t = np.asarray(tokens, dtype=float)
    design = np.stack([np.ones_like(t), t, t * t], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(values, dtype=float), rcond=None)
    residual = np.max(np.abs(design @ coef - values) / np.asarray(values, dtype=float))
    return coef.tolist(), float(residual)


def measure(model, dataset, tokens):
    from xtuner_vitask.datasets import vitask_collate_fn

    out = {"tokens": tokens, "pass": {}, "step": {}}
    batch = vitask_collate_fn([dataset[0]])["data"]
    out["sample_tokens"] = int(batch["input_ids"].shape[1])
    for ckpt in (False, True):
        set_checkpointing(model, ckpt)
        key = "ckpt" if ckpt else "no_ckpt"
        per = {}
        for n in (1, 2):
            with llm_layers(model, n):
                per[n] = [one_pass(model, t) for t in tokens]
        layer = [b - a for a, b in zip(per[1], per[2])]
        rest = [a - l for a, l in zip(per[1], layer)]
        (la, lb, lc), lres = fit(tokens, layer)
        (ra, rb, rc), rres = fit(tokens, rest)
        out["pass"][key] = {"layer_bytes": layer, "rest_bytes": rest, "layer_fit": [la, lb, lc], "layer_fit_residual": lres,
                            "rest_fit": [ra, rb, rc], "rest_fit_residual": rres}
        steps = {}
        for stage in (0, 1, 2):
            by_depth = {}
            for n in (1, 2):
                with llm_layers(model, n):
                    by_depth[n] = step_terms(model, batch if stage < 2 else with_negatives(dataset, batch), stage)
            steps[stage] = {"layer_bytes": by_depth[2] - by_depth[1], "rest_bytes": 2 * by_depth[1] - by_depth[2]}
        out["step"][key] = steps
        print(f"measured (checkpointing {'on' if ckpt else 'off'}): per layer {layer} bytes at T={tokens}", flush=True)
    set_checkpointing(model, True)
    return out


def with_negatives(dataset, batch):
    return dataset.attach_negatives(dict(batch))


# ------------------------------------------------------------------------------------------- computing
def estimate(m, params, layers=24, vit_layers=24, batch=8, tokens=370, reserve_gib=2.0):
    """GiB of a training step at full size (see the module docstring for what is computed)."""
    rows = {}
    # parameters: per-layer counts x depth + the rest, at the measured bytes per parameter
    def full_count(part, depth):
        d = params[part]
        per_layer = d["layer0_params"]
        return d["params"] - 2 * per_layer + depth * per_layer if per_layer else d["params"]

    weight_bytes, trainable = 0.0, 0.0
    for part, d in params.items():
        depth = vit_layers if part == "vit" else layers
        n = tsm_parameters() if part == "tsm" else full_count(part, depth)
        weight_bytes += n * d["bytes"] / d["params"]
        trainable += n * d["trainable"] / d["params"]
    optimizer_bytes = trainable * (4 + 8)  # fp32 gradients + AdamW's two fp32 moments
    static = (weight_bytes + optimizer_bytes) / GIB + reserve_gib
    # a (the fit's constant) does not grow with the batch: bf16 copies of the frozen fp32 weights that autocast
    # makes for each matmul and autograd keeps; b T + c T^2 is per sample
    for key in ("no_ckpt", "ckpt"):
        la, lb, lc = m["pass"][key]["layer_fit"]
        ra, rb, rc = m["pass"][key]["rest_fit"]
        na, nb, nc = m["pass"]["no_ckpt"]["layer_fit"]
        for attn in ("eager", "flash"):
            quad = 1.0 if attn == "eager" else 0.0
            layer = la + batch * (lb * tokens + quad * lc * tokens**2)
            rest = ra + batch * (rb * tokens + quad * rc * tokens**2)
            # with checkpointing, backward re-runs one layer at a time as without it
            recompute = na + batch * (nb * tokens + quad * nc * tokens**2) if key == "ckpt" else 0.0
            for stage, passes in ((0, 1), (1, 2), (2, 3)):
                act = passes * (layers * layer + rest) + recompute
                rows[(stage, key, attn)] = {"activations_gib": act / GIB, "total_gib": act / GIB + static}
    return {"weights_gib": weight_bytes / GIB, "optimizer_gib": optimizer_bytes / GIB, "trainable": trainable,
            "reserve_gib": reserve_gib, "static_gib": static, "rows": rows}


def print_tables(m, params, est, args):
    print("\nMeasured (batch 1, one LLM pass, bytes saved for backward; bf16 autocast, eager attention):")
    print("| checkpointing | per layer: MiB per pass (a) | per layer: bytes/token (b) | per layer: bytes/token^2 (c) "
          "| rest: bytes/token | fit residual |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, name in (("no_ckpt", "off"), ("ckpt", "on")):
        p = m["pass"][key]
        print(f"| {name} | {p['layer_fit'][0] / 2**20:.1f} | {p['layer_fit'][1]:.0f} | {p['layer_fit'][2]:.1f} | "
              f"{p['rest_fit'][1]:.0f} | {max(p['layer_fit_residual'], p['rest_fit_residual']):.1%} |")
    print(f"\nMeasured VITask step at batch 1 (a real sample, {m['sample_tokens']} tokens): MiB saved per LLM layer / rest")
    print("| checkpointing | vanilla | stage 1 | stage 2 |\n|---|---:|---:|---:|")
    for key, name in (("no_ckpt", "off"), ("ckpt", "on")):
        cells = [f"{m['step'][key][s]['layer_bytes'] / 2**20:.1f} / {m['step'][key][s]['rest_bytes'] / 2**20:.1f}"
                 for s in (0, 1, 2)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nParameters (measured dtype; counts of the small preset, per layer x depth for full size; TSM: "
          f"ViT-B/16, {tsm_parameters() / 1e6:.1f} M):")
    for part, d in sorted(params.items()):
        print(f"  {part}: {d['params'] / 1e6:.1f} M in the small preset ({', '.join(d['dtypes'])}), "
              f"{d['bytes'] / d['params']:.1f} bytes each, trainable {d['trainable'] / 1e6:.2f} M")
    print(f"\nComputed for InternVL2-2B (24+24 layers), batch {args.batch}, {args.target_tokens} tokens per sample: "
          f"weights {est['weights_gib']:.1f} GiB, gradients + AdamW {est['optimizer_gib']:.1f} GiB "
          f"({est['trainable'] / 1e6:.1f} M trainable), reserve {est['reserve_gib']:.1f} GiB")
    print("| step (LLM passes) | checkpointing | activations GiB (eager / flash) | total GiB (eager / flash) | "
          "fits 24 / 40 / 80 GB (eager) |")
    print("|---|---|---:|---:|---|")
    for stage, name in ((0, "vanilla (1)"), (1, "stage 1 (2)"), (2, "stage 2 (3)")):
        for key, ck in (("no_ckpt", "off"), ("ckpt", "on")):
            e, f = est["rows"][(stage, key, "eager")], est["rows"][(stage, key, "flash")]
            fits = " / ".join("yes" if e["total_gib"] * GIB <= g * 1e9 else "no" for g in (24, 40, 80))
            print(f"| {name} | {ck} | {e['activations_gib']:.1f} / {f['activations_gib']:.1f} | "
                  f"{e['total_gib']:.1f} / {f['total_gib']:.1f} | {fits} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="the dry run's cache folder (the small preset is built there)")
    parser.add_argument("--size", default="small", choices=("small", "tiny"), help="preset to measure on")
    parser.add_argument("--tokens", default="128,256,384,512", help="sequence lengths of the per-pass fit")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--target-tokens", type=int, default=370)
    parser.add_argument("--reserve-gib", type=float, default=2.0, help="CUDA context + allocator reserve (GiB)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)

    cache = Path(args.cache).expanduser().absolute()
    work = cache / f"activation_memory_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    folder, _ = dry_run_2b.ensure_model(cache, args.size, work / "logs")
    data = work / "dermamnist_224"
    if not (data / "meta.json").is_file():
        data = dry_run_2b.make_data(work, 4, 224)
    tsms = sorted((work / "tsm").glob("best_*.pth"))
    tsm = tsms[-1] if tsms else dry_run_2b.train_tsm(work, data, work / "logs")

    model, dataset, _ = build(folder, data, tsm)
    params = parameter_bytes(model)
    tokens = [int(t) for t in args.tokens.split(",")]
    m = measure(model, dataset, tokens)
    est = estimate(m, params, batch=args.batch, tokens=args.target_tokens, reserve_gib=args.reserve_gib)
    print_tables(m, params, est, args)
    if args.json:
        rows = {f"{s}/{k}/{a}": v for (s, k, a), v in est["rows"].items()}
        Path(args.json).write_text(json.dumps({"measured": m, "parameters": params,
                                               "estimate": dict(est, rows=rows)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
