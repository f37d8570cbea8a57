"""Pretrain the tiny InternVL2 into a small *generalist* before any task is seen.

The paper's premise (sec. 3-4) is a VLM that is pretrained but not specialised for the task: its
frozen vision encoder carries generic visual features, which fine-tuning on a narrow task reads
only partly. A random-weight tiny model carries almost none, so the demo and the ablation would
test something else. This module pretrains every part of the tiny InternVL2 (ViT, mlp1, LLM)
offline, in a few CPU minutes, on a generic synthetic image-text corpus -- coloured shapes with
captions of shape, colour, count and position, and short questions about them -- that shares no
label, instruction or image style with the MedMNIST-layout target sets. VITask then freezes the
ViT and mlp1 as for InternVL2-2B.

The training step is the project's own InternVL2 wrapper (XTuner's InternVL path) with nothing
frozen, on XTuner-format JSONL read by the project's InternVL2 dataset: the corpus goes through the
same chat template and tokenisation as fine-tuning. Same arguments, same thread count -> the same
weights (seeded corpus, seeded order, deterministic CPU kernels).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xtuner_vitask.errors import VITaskError
from xtuner_vitask.logs import quiet_mmengine

from .medmnist_npz import shape_mask

COLOURS = {"red": (215, 45, 40), "green": (40, 170, 70), "blue": (45, 85, 215), "yellow": (225, 205, 45),
           "white": (240, 240, 240), "purple": (140, 60, 180)}
SHAPE_WORDS = {"circle": "disc", "ring": "ring", "square": "square", "cross": "cross", "triangle": "triangle",
               "bar": "bar"}  # caption word -> shape_mask kind
POSITIONS = {"at the top left": (0.28, 0.28), "at the top right": (0.28, 0.72), "at the bottom left": (0.72, 0.28),
             "at the bottom right": (0.72, 0.72), "in the centre": (0.5, 0.5), "at the top": (0.25, 0.5),
             "at the bottom": (0.75, 0.5), "on the left": (0.5, 0.25), "on the right": (0.5, 0.75)}
COUNTS = ("one", "two", "three")
QUESTIONS = {"describe": "Describe the image.", "count": "How many shapes are there?",
             "colour": "What colour are the shapes?", "shape": "What shape is shown?",
             "position": "Where is the shape?"}
MARKER = "pretraining.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Corpus size and schedule (defaults: ~2-4 CPU minutes for the default tiny model)."""

    n_images: int = 3000
    colour_epochs: int = 2  # curriculum: colour questions only first -- the tiny LLM finds the image tokens
    epochs: int = 3  # then every question type
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    seed: int = 0
    system: str | None = None  # system message; None: the chat template's own (as fine-tuning uses)


def _plural(word, count):
    return word if count == "one" else ("crosses" if word == "cross" else word + "s")


def make_scene(rng, size):
    """One generic scene: an RGB uint8 image and the facts its captions state."""
    count = COUNTS[rng.integers(len(COUNTS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = list(SHAPE_WORDS)[rng.integers(len(SHAPE_WORDS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))] if count == "one" else None
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = rng.uniform(20, 120) + rng.normal(0, rng.uniform(2, 12), (size, size, 1))
    shading = rng.uniform(-25, 25) * (yy if rng.random() < 0.5 else xx)[..., None] / size
    canvas = np.repeat(background + shading, 3, axis=2).astype(np.float32)
    n = COUNTS.index(count) + 1
    if position is not None:
        centres = [np.array(POSITIONS[position]) + rng.uniform(-0.05, 0.05, 2)]
        radii = [rng.uniform(0.12, 0.2)]
    else:  # a few shapes in distinct cells of a 3 x 3 grid
        cells = rng.choice(9, size=n, replace=False)
        centres = [np.array(((c // 3) * 0.3 + 0.2, (c % 3) * 0.3 + 0.2)) + rng.uniform(-0.04, 0.04, 2)
                   for c in cells]
        radii = [rng.uniform(0.08, 0.12) for _ in cells]
    rgb = np.array(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.1)
    for (cy, cx), r in zip(centres, radii):
        mask = shape_mask(SHAPE_WORDS[shape], yy, xx, cy * size, cx * size, r * size)[..., None]
        canvas = canvas * (1 - mask) + rgb * mask
    canvas += rng.normal(0, 6, canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, dict(count=count, colour=colour, shape=shape, position=position)


def captions(facts):
    """(question key, answer) pairs that the scene supports."""
    noun = _plural(facts["shape"], facts["count"])
    where = f" {facts['position']}" if facts["position"] else ""
    pairs = [("describe", f"{facts['count']} {facts['colour']} {noun}{where}."), ("count", f"{facts['count']}."),
             ("colour", f"{facts['colour']}."), ("shape", f"{noun}.")]
    if facts["position"]:
        pairs.append(("position", f"{facts['position']}."))
    return pairs


def write_corpus(folder, n_images, size, seed):
    """PNGs + two XTuner-format JSONL files over the same images: ``colour.jsonl`` (the colour question of
    every image) and ``corpus.jsonl`` (a seeded question of every kind the scene supports)."""
    from PIL import Image

    rng = np.random.default_rng([seed, 20231])
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colour, mixed = [], []
    for i in range(n_images):
        image, facts = make_scene(rng, size)
        name = f"images/{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        pairs = dict(captions(facts))
        key = list(pairs)[rng.integers(len(pairs))]
        for records, (question, answer) in ((colour, ("colour", pairs["colour"])), (mixed, (key, pairs[key]))):
            records.append({"id": f"pretrain/{i:05d}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[question]}"}, {"from": "gpt", "value": answer}]})
    for name, records in (("colour.jsonl", colour), ("corpus.jsonl", mixed)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder / "colour.jsonl", folder / "corpus.jsonl"


def pretrain(model_dir, out_dir, settings=PretrainSettings(), progress=True, echo=print, provenance=None):
    """Pretrain the InternVL2 folder ``model_dir`` on the generic corpus; write the result to ``out_dir``.

    ``out_dir`` gets every file of ``model_dir`` (config, remote code, tokenizer) with the trained
    ``model.safetensors`` and a ``pretraining.json`` that records the settings, the loss curve and
    the time (and ``provenance``, how ``model_dir`` was made). Written under a temporary name and
    renamed. Returns ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup
    from xtuner.dataset.collate_fns import default_collate_fn

    from ..datasets.internvl import InternVL2Dataset
    from ..models.internvl import InternVL2

    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir).absolute()
    if not (model_dir / "config.json").is_file():
        raise VITaskError(f"{model_dir} has no config.json: build the tiny model first (xtuner-vitask make-tiny)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    started = time.perf_counter()
    try:
        with open(model_dir / "config.json", encoding="utf-8") as f:
            image_size = json.load(f)["force_image_size"]
        phases = write_corpus(staging / "corpus", settings.n_images, image_size, settings.seed)
        with torch.random.fork_rng(devices=[]), quiet_mmengine():
            torch.manual_seed(settings.seed)
            datasets = [InternVL2Dataset(str(model_dir), str(path), dynamic_image_size=False, max_length=512,
                                         system=settings.system) for path in phases]
            model = InternVL2(str(model_dir), freeze_llm=False, freeze_visual_encoder=False, freeze_mlp1=False,
                              attn_implementation="eager", torch_dtype="float32", activation_checkpointing=False)
            model.train()
            order = torch.Generator().manual_seed(settings.seed)
            loaders = [torch.utils.data.DataLoader(d, batch_size=settings.batch_size, shuffle=True, generator=order,
                                                   collate_fn=default_collate_fn, num_workers=0) for d in datasets]
            plan = [loaders[0]] * settings.colour_epochs + [loaders[1]] * settings.epochs
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
            total = sum(len(loader) for loader in plan)
            schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total), total)
            losses = []
            bar = tqdm(total=total, desc="pretraining the tiny InternVL2", disable=not progress, unit="step")
            for loader in plan:
                for batch in loader:
                    loss = model(batch["data"])["loss"]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    losses.append(round(loss.item(), 4))
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    bar.update()
            bar.close()
        weights = {k: v.detach().contiguous() for k, v in model.model.state_dict().items()}
        shutil.rmtree(staging / "corpus")
        for src in model_dir.iterdir():
            if src.is_file() and src.name not in ("model.safetensors", MARKER):
                shutil.copyfile(src, staging / src.name)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        record = {"settings": asdict(settings), "base": provenance or str(model_dir), "steps": len(losses),
                  "loss_first_10": float(np.mean(losses[:10])), "loss_last_10": float(np.mean(losses[-10:])),
                  "loss": losses, "seconds": round(time.perf_counter() - started, 1),
                  "corpus": "generated coloured shapes (circle, ring, square, cross, triangle, bar) with captions of "
                            "shape, colour, count and position; no task labels"}
        (staging / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        with open(staging / "README.md", "a", encoding="utf-8") as f:
            f.write(f"\nPretrained by xtuner_vitask.testing.pretrain ({len(losses)} steps on {settings.n_images} "
                    f"generated shape images, seed {settings.seed}; loss {record['loss_first_10']:.2f} -> "
                    f"{record['loss_last_10']:.2f}): a tiny generalist, not a task model.\n")
        os.chmod(staging, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if echo:
        echo(f"pretrained {out_dir}: {len(losses)} steps, loss {record['loss_first_10']:.3f} -> "
             f"{record['loss_last_10']:.3f}, {record['seconds']:.0f} s")
    return out_dir


def read_pretraining(model_dir):
    """The ``pretraining.json`` record of a pretrained folder, or None for a random-weight one."""
    path = Path(model_dir) / MARKER
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def build_pretrained_tiny(out_dir, settings=PretrainSettings(), progress=True, echo=print, **tiny_kwargs):
    """``build_tiny_internvl(**tiny_kwargs)`` then :func:`pretrain`; reused when ``out_dir`` already holds
    a model pretrained with the same settings."""
    from .tiny_internvl import build_tiny_internvl

    out_dir = Path(out_dir).absolute()
    provenance = {"build_tiny_internvl": dict(sorted(tiny_kwargs.items()))}
    done = read_pretraining(out_dir)
    if done is not None and done["settings"] == asdict(settings) and done["base"] == provenance:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-random-", dir=out_dir.parent) as tmp:
        random_dir = build_tiny_internvl(Path(tmp) / "random", force=True, **tiny_kwargs)
        return pretrain(random_dir, out_dir, settings, progress=progress, echo=echo, provenance=provenance)
