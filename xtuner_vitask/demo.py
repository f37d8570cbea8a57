"""The end-to-end demo: data -> TSM -> VITask and the vanilla recipe -> export -> eval -> chat -> one table.

Every step is the tool a user would run: data_tools' converter, XTuner's own train tool and
``pth_to_hf`` (as subprocesses, their exit status checked), the project's evaluation of the
exported folders and its chat session. By default the data set is *generated* (learnable
synthetic images in the exact MedMNIST npz layout, labelled as generated in meta.json, in the
PNGs' titles and in results.json); ``flag=..., download=True`` runs a real MedMNIST set instead.

The VLM is the tiny InternVL2 of :mod:`xtuner_vitask.testing` (InternLM2 LLM, InternVL2-2B's layout),
first pretrained offline into a small generalist on captioned coloured shapes
(:mod:`xtuner_vitask.testing.pretrain`, cached): a pretrained but unspecialised VLM, the paper's
premise. Its vision encoder stays frozen; the generated task's classes differ in shape, region,
texture and brightness, which such an encoder reads only partly, while the TSM learns the images.
Both recipes run with the schedule of their demo config (configs/*_tiny_demo*.py; README "Fair protocol").
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .contract import load_meta, read_jsonl
from .errors import VITaskError

CONFIGS = {"tsm": "tsm_tiny_cpu", "vitask": "vitask_tiny_demo", "vanilla": "internvl2_tiny_demo_lora"}
TINY_LLM = "internlm2"  # the LLM class of the tiny InternVL2 (InternVL2-2B/8B's LLM)
ROW_NAMES = {"vanilla": "vanilla (XTuner InternVL2 LoRA recipe)", "vitask_no_ep": "VITask w/o EP",
             "vitask_ep": "VITask w/ EP", "tsm": "TSM (tiny ViT classifier)"}


@dataclass(frozen=True)
class DemoSettings:
    """Data, model and TSM of one demo run. The VLM schedule is the tiny configs' own (stage 1 + stage 2
    epochs of configs/vitask_tiny_demo.py = the epochs of configs/internvl2_tiny_demo_lora.py)."""

    flag: str = "octmnist"  # 4 classes, short label names: a tiny LLM learns them in minutes
    n_per_split: tuple = (560, 70, 280)  # generated set: train, val, test images
    data_style: str = "shapes"  # medmnist_npz style: class = shape + region, partly visible to a frozen encoder
    pretrained: bool = True  # the tiny InternVL2 pretrained into a small generalist (make-tiny --pretrain)
    vlm_image_size: int = 64
    tsm_epochs: int = 8
    eval_batch_size: int = 16


FULL = DemoSettings()
QUICK = replace(FULL, n_per_split=(64, 16, 32), tsm_epochs=4, pretrained=False)  # smoke run: random tiny VLM


# ----------------------------------------------------------------------------------------- data
def make_data(out_dir, flag, download=False, n_per_split=FULL.n_per_split, seed=0,
              instruction_variant="complete", progress=False, style=FULL.data_style, domain="source"):
    """The instruction data folder (train/val/test.jsonl + images + meta.json) under ``out_dir``.

    Without ``download``: a generated npz in MedMNIST's layout (``generated/<flag>[_external].npz`` plus
    its ``.generated.json`` marker, which the converter copies into meta.json; ``domain="external"``:
    the same classes under a shifted acquisition, paper Table 3). With ``download``: medmnist's real
    28 px file, fetched by medmnist where a network exists.
    """
    from .data.convert import convert_medmnist
    from .data.npz import generated_marker
    from .testing.medmnist_npz import write_medmnist_npz

    out_dir = Path(out_dir)
    suffix = "".join(f"_{v}" for v, default in ((instruction_variant, "complete"), (domain, "source")) if v != default)
    data_dir = out_dir / f"data{suffix}"
    if download:
        return convert_medmnist(flag, 28, data_dir, root=out_dir / "medmnist", download=True, verify=True,
                                instruction_variant=instruction_variant, force=True, progress=progress)
    npz = out_dir / "generated" / (f"{flag}.npz" if domain == "source" else f"{flag}_{domain}.npz")
    wanted = {"flag": flag, "seed": seed, "style": style, "domain": domain,
              "n_per_split": dict(zip(("train", "val", "test"), map(int, n_per_split)))}
    marker = generated_marker(npz)
    made = json.loads(marker.read_text()) if npz.is_file() and marker.is_file() else {}
    if any(made.get(k) != v for k, v in wanted.items()):
        write_medmnist_npz(npz, flag, n_per_split=n_per_split, size=28, seed=seed, learnable=True, style=style,
                           domain=domain)
    elif (data_dir / "meta.json").is_file() and read_meta(data_dir).get("generated") == made:
        return data_dir  # converted from this very npz before
    import warnings

    with warnings.catch_warnings():  # split sizes differ from medmnist.INFO's: expected for a generated set
        warnings.simplefilter("ignore")
        return convert_medmnist(flag, 28, data_dir, npz_path=npz, instruction_variant=instruction_variant,
                                force=True, progress=progress)


def read_meta(data_dir):
    return load_meta(data_dir).raw


def data_label(meta):
    """'generated' for a generated set (as results.json names it), else the MedMNIST flag."""
    return "generated" if meta.get("generated") else meta["dataset"]


def build_vlm(out_dir, image_size=FULL.vlm_image_size, pretrained=True, echo=print):
    """The tiny InternVL2 folder: pretrained into a small generalist (``make-tiny --pretrain``) or with random
    weights; reused when already there (the pretrained one when made with the same settings)."""
    from .testing import build_tiny_internvl
    from .testing.pretrain import build_pretrained_tiny

    tiny = dict(llm=TINY_LLM, image_size=image_size, patch_size=16)
    if pretrained:
        return Path(build_pretrained_tiny(Path(out_dir) / "tiny_internvl2_pretrained", echo=echo, **tiny))
    path = Path(out_dir) / "tiny_internvl2"
    if (path / "config.json").is_file():
        return path
    return Path(build_tiny_internvl(path, force=True, **tiny))


# ------------------------------------------------------------------------------------ training
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env():
    """Environment of the train/convert tools: offline, single CPU process, no network probing."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")


_ITER = re.compile(r"Iter\(train\) \[\s*(\d+)/(\d+)\]")
_EPOCH = re.compile(r"Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]")
_VAL = re.compile(r"Epoch\(val\)\s*\[(\d+)\].*?accuracy: ([\d.]+)\s+macro_f1: ([\d.]+)")
_LOSS = re.compile(r"\b(loss(?:_\w+)?): ([\d.]+(?:e[-+]\d+)?)")
_STAGE_OR_EVAL = re.compile(r"(VITask stage \d.*|VITaskEvalHook iter .*)$")


def progress_line(name, line):
    """One short line for a step of the train tool's log (None for lines that are not steps)."""
    losses = " ".join(f"{k.replace('loss_', '')}={float(v):.3f}" for k, v in _LOSS.findall(line))
    m = _ITER.search(line)
    if m:
        return f"[{name}] step {m.group(1)}/{m.group(2)}  {losses}"
    m = _EPOCH.search(line)
    if m:
        return f"[{name}] epoch {m.group(1)} step {m.group(2)}/{m.group(3)}  {losses}"
    m = _VAL.search(line)
    if m:
        return f"[{name}] epoch {m.group(1)} val accuracy={float(m.group(2)):.3f} macro_f1={float(m.group(3)):.3f}"
    m = _STAGE_OR_EVAL.search(line)
    if m:
        return f"[{name}] {m.group(1)}"
    return None


def run_tool(args, name, log_path, echo=print):
    """Run ``python -m <args>`` from the repo root, log everything, echo one line per step; raise on failure."""
    cmd = [sys.executable, "-m", *map(str, args)]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            short = progress_line(name, line.rstrip())
            if short and echo:
                echo(short)
        code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise VITaskError(f"{name} failed (exit {code}); last lines of {log_path}:\n{tail}")


def config_file(config_key):
    """The shipped tiny config of ``config_key`` ('tsm', 'vitask' or 'vanilla'), wheel installs included."""
    from .config_files import config_path

    return config_path(CONFIGS[config_key])


def train(config_key, work_dir, options, name, log_dir, echo=print):
    """XTuner's train tool on one of the tiny configs; returns the work dir."""
    work_dir = Path(work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)
    run_tool(["xtuner.tools.train", config_file(config_key), "--work-dir", work_dir, "--cfg-options", *options],
             name, Path(log_dir) / f"train_{name}.log", echo)
    return work_dir


def final_checkpoint(work_dir):
    """The training run's last ``iter_N.pth`` (the eval hook's ``best_*.pth`` are not it)."""
    found = sorted(Path(work_dir).glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    if not found:
        raise VITaskError(f"{work_dir} has no iter_*.pth: the training run did not save its last step")
    return found[-1]


def best_tsm_checkpoint(work_dir):
    found = sorted(Path(work_dir).glob("best_macro_f1_epoch_*.pth"), key=os.path.getmtime)
    if not found:
        raise VITaskError(f"{work_dir} has no best_macro_f1_epoch_*.pth: the TSM run did not validate")
    return found[-1]


def tsm_options(data_dir, epochs, seed=0):
    d = Path(data_dir)
    return [f"train_dataloader.dataset.data_file={d}/train.jsonl", f"val_dataloader.dataset.data_file={d}/val.jsonl",
            f"test_dataloader.dataset.data_file={d}/test.jsonl", f"model.meta={d}/meta.json",
            f"train_cfg.max_epochs={epochs}", "default_hooks.logger.interval=1", f"randomness.seed={seed}"]


def vlm_options(model_dir, data_dir, seed=0, eval_batch_size=16):
    """Options shared by the VITask and vanilla tiny configs: model, data, seed (weights and data order),
    end-of-run val eval. Nothing about the schedule: that is the configs' own."""
    return [f"model.model_path={model_dir}", f"train_dataloader.dataset.model_path={model_dir}",
            f"train_dataloader.dataset.data_paths={Path(data_dir) / 'train.jsonl'}",
            f"randomness.seed={seed}", f"train_dataloader.sampler.seed={seed}", "model.llm=None",
            "default_hooks.checkpoint.interval=100000", f"custom_hooks.{{hook}}.batch_size={eval_batch_size}"]


def vitask_options(model_dir, data_dir, tsm_checkpoint, settings=FULL, seed=0, extra=()):
    """--cfg-options for configs/vitask_tiny_demo.py (hooks: 0 = stage switch, 1 = eval)."""
    opts = [o.format(hook=1) for o in vlm_options(model_dir, data_dir, seed, settings.eval_batch_size)]
    return opts + [f"model.tsm.meta={Path(data_dir) / 'meta.json'}", f"model.tsm.checkpoint={tsm_checkpoint}",
                   f"train_dataloader.dataset.tsm_checkpoint={tsm_checkpoint}", "custom_hooks.1.interval=100000",
                   *extra]


def vanilla_options(model_dir, data_dir, settings=FULL, seed=0, extra=()):
    """--cfg-options for configs/internvl2_tiny_demo_lora.py (hook 0 = eval)."""
    opts = [o.format(hook=0) for o in vlm_options(model_dir, data_dir, seed, settings.eval_batch_size)]
    return opts + ["custom_hooks.0.interval=100000", *extra]


# ----------------------------------------------------------------------------- TSM evaluation
def tsm_test_metrics(checkpoint, data_dir, split="test", batch_size=64):
    """Accuracy and macro-F1 of the trained TSM on ``split`` (in-process predict)."""
    import numpy as np
    import torch

    from .tsm.dataset import ImageClassificationDataset, tsm_collate
    from .metrics import classification_metrics
    from .tsm.checkpoint import load_tsm

    tsm = load_tsm(str(checkpoint)).eval()
    data = ImageClassificationDataset(Path(data_dir) / f"{split}.jsonl", img_size=tsm.img_size, mean=tsm.mean,
                                      std=tsm.std)
    meta = data.meta
    truths, preds = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = tsm_collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            for out in tsm(batch["inputs"], batch["data_samples"], mode="predict"):
                truths.append(out["gt_label"].numpy().astype(int))  # class index, or multi-hot row
                preds.append(out["pred_label"].numpy().astype(int))
    m = classification_metrics(np.stack(truths), np.stack(preds), meta["task_type"], len(meta["label_names"]))
    return {"accuracy": float(m["accuracy"]), "macro_f1": float(m["macro_f1"]),
            "confusion_matrix": m.get("confusion_matrix")}


# ---------------------------------------------------------------------------- export / eval
def export(config_key, checkpoint, out_dir, options, name, log_dir, plain=False, echo=print):
    """XTuner's ``pth_to_hf`` on a trained checkpoint (EP variant, or ``plain`` InternVL2 folder)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    args = ["xtuner.tools.model_converters.pth_to_hf", config_file(config_key), checkpoint, out_dir]
    if plain:
        args += ["--save-format", "official"]
    run_tool(args + ["--cfg-options", *options], name, Path(log_dir) / f"export_{name}.log", echo)
    return out_dir


def evaluate(export_dir, data_dir, use_ep, out_dir, split="test", batch_size=16, progress=True, model=None):
    """Rank evaluation of an export on ``split`` (report written to ``out_dir``); returns the report.
    ``model``: an already loaded export to reuse (the EP wrapper also ranks without EP)."""
    from .evaluation.evaluate import write_report
    from .inference.exports import evaluate_export

    report = evaluate_export(str(export_dir), str(Path(data_dir) / f"{split}.jsonl"), use_ep=use_ep, mode="rank",
                             batch_size=batch_size, progress=progress, model=model)
    write_report(report, str(out_dir))
    return report


def chat_once(export_dir, image, prompt, use_ep=None, max_new_tokens=24):
    """One greedy answer of the exported model about ``image``."""
    from .inference.chat import ChatSession

    return ChatSession(str(export_dir), str(image), use_ep=use_ep).ask(prompt, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------------- output
def results_table(rows, data_name):
    """The demo's one table (markdown); mean ± std over seeds when the rows hold more than one seed."""
    def cell(r, key):
        many = len(r.get("per_seed", ())) > 1
        return f"{r[key]:.3f} ± {r[key + '_std']:.3f}" if many else f"{r[key]:.3f}"

    lines = [f"| model ({data_name} data, test split) | accuracy | macro-F1 |", "|---|---:|---:|"]
    lines += [f"| {ROW_NAMES.get(r['model'], r['model'])} | {cell(r, 'accuracy')} | {cell(r, 'macro_f1')} |"
              for r in rows]
    return "\n".join(lines)


def write_json_atomic(path, obj):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    return path


def scalars_of(work_dir):
    from .evaluation.plots import read_scalars

    return [r for r in read_scalars(str(work_dir)) if "loss" in r]


def plot_training(curves, path, title):
    """Loss terms against step, one panel per run: ``curves`` = {run name: mmengine scalar records}."""
    from .evaluation.plots import _pyplot, _save_atomic

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    try:
        for ax, (name, records) in zip(axes[0], curves.items()):
            keys = [k for k in ("loss", "loss_van", "loss_ep", "loss_rda", "loss_crt") if any(k in r for r in records)]
            for key in keys:
                rows = [r for r in records if key in r]
                ax.plot([r.get("step", r.get("iter", i)) for i, r in enumerate(rows)], [r[key] for r in rows],
                        lw=1, label=key)
            ax.set(xlabel="step", ylabel="loss", title=f"{name}", yscale="log")
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        return _save_atomic(fig, str(path))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------- the run
def train_and_score(out, settings, flag, download, seed, model_dir, step, echo=print):
    """One seed of the demo in ``out``: data -> TSM -> VITask and the vanilla recipe -> pth_to_hf -> test-split
    evaluation of both exports (VITask with and without EP) and of the TSM. Returns what the outputs need."""
    logs, runs = out / "logs", out / "runs"
    step(f"data: {'MedMNIST ' + flag + ' (download)' if download else 'generated ' + flag + ' (MedMNIST npz layout)'}")
    data_dir = make_data(out, flag, download=download, n_per_split=settings.n_per_split, seed=seed,
                         style=settings.data_style)
    meta = read_meta(data_dir)
    name = data_label(meta)
    counts = {k: v["total"] for k, v in meta["counts"].items()}
    echo(f"{data_dir}: {len(meta['label_names'])} classes {meta['label_names']}, {counts}"
         + (" -- GENERATED images, not real MedMNIST" if name == "generated" else ""))

    step("TSM: tiny ViT classifier trained on the task")
    tsm_work = train("tsm", runs / "tsm", tsm_options(data_dir, settings.tsm_epochs, seed), "tsm", logs, echo)
    tsm_ckpt = best_tsm_checkpoint(tsm_work)

    step("VITask: stage 1 (L_van + L_EP + alpha L_RDA) then stage 2 (+ beta L_CRT, connector frozen)")
    v_opts = vitask_options(model_dir, data_dir, tsm_ckpt, settings, seed)
    vitask_work = train("vitask", runs / "vitask", v_opts, "vitask", logs, echo)
    step("vanilla: XTuner's InternVL2 LoRA recipe, same files, same number of steps")
    n_opts = vanilla_options(model_dir, data_dir, settings, seed)
    vanilla_work = train("vanilla", runs / "vanilla", n_opts, "vanilla", logs, echo)

    step("export with XTuner's pth_to_hf")
    exports = out / "exports"
    vitask_hf = export("vitask", final_checkpoint(vitask_work), exports / "vitask_ep", v_opts, "vitask", logs, echo=echo)
    vanilla_hf = export("vanilla", final_checkpoint(vanilla_work), exports / "vanilla", n_opts, "vanilla", logs,
                        plain=True, echo=echo)

    step("evaluate on the test split (likelihood ranking of the label names)")
    evals = out / "eval"
    from .export.folder import inspect_export
    from .inference.exports import load_export_model
    from .logs import quiet_mmengine

    with quiet_mmengine():  # XTuner's wrapper logs its whole module tree
        vitask_model = load_export_model(inspect_export(str(vitask_hf), need_ep=True), use_ep=True)  # loaded once
    reports = {"vanilla": evaluate(vanilla_hf, data_dir, False, evals / "vanilla", batch_size=settings.eval_batch_size),
               "vitask_no_ep": evaluate(vitask_hf, data_dir, False, evals / "vitask_no_ep",
                                        batch_size=settings.eval_batch_size, model=vitask_model),
               "vitask_ep": evaluate(vitask_hf, data_dir, True, evals / "vitask_ep",
                                     batch_size=settings.eval_batch_size, model=vitask_model)}
    tsm_metrics = tsm_test_metrics(tsm_ckpt, data_dir)
    rows = [{"model": key, "accuracy": float(r["accuracy"]), "macro_f1": float(r["macro_f1"])}
            for key, r in reports.items()]
    rows.append({"model": "tsm", "accuracy": tsm_metrics["accuracy"], "macro_f1": tsm_metrics["macro_f1"]})
    return dict(data_dir=data_dir, meta=meta, name=name, rows=rows, reports=reports, tsm_metrics=tsm_metrics,
                works=(vitask_work, vanilla_work, tsm_work), exports=(vitask_hf, vanilla_hf), vitask_model=vitask_model)


def seed_rows(per_seed):
    """{seed: rows} -> rows of mean accuracy / macro-F1 over the seeds, each with its std and per-seed values."""
    import statistics

    seeds = list(per_seed)
    out = []
    for i, row in enumerate(per_seed[seeds[0]]):
        vals = {k: [per_seed[s][i][k] for s in seeds] for k in ("accuracy", "macro_f1")}
        out.append({"model": row["model"], **{k: statistics.mean(v) for k, v in vals.items()},
                    **{f"{k}_std": statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in vals.items()},
                    "per_seed": {str(s): {k: per_seed[s][i][k] for k in vals} for s in seeds}})
    return out


def run_demo(out_dir="vitask_demo", flag=None, download=False, quick=False, seed=0, seeds=1, echo=print):
    """Run the whole demo over ``seeds`` seeds (seed, seed + 1, ...); returns the results dict (also written to
    ``out_dir/results.json``). The first seed's run is in ``out_dir`` with every figure and the chat; the others
    are in ``out_dir/seeds/seed<N>``. Each seed draws its own generated data, TSM, LoRA init and data order."""
    started = time.perf_counter()
    settings = QUICK if quick else FULL
    flag = flag or settings.flag
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    all_seeds = list(range(seed, seed + max(1, int(seeds))))

    def step(text, tag=""):
        echo(f"\n== {tag}{text}  [{time.perf_counter() - started:.0f} s]")

    step("tiny InternVL2 (InternLM2 LLM): " + ("pretrained into a small generalist on captioned shapes, cached"
                                              if settings.pretrained else "random weights (--quick)"))
    model_dir = build_vlm(out, settings.vlm_image_size, pretrained=settings.pretrained, echo=echo)
    first = train_and_score(out, settings, flag, download, seed, model_dir,
                            lambda t: step(t, f"seed {seed}: " if len(all_seeds) > 1 else ""), echo)
    name, meta, data_dir = first["name"], first["meta"], first["data_dir"]
    vitask_hf, vanilla_hf = first["exports"]
    vitask_work, vanilla_work, tsm_work = first["works"]

    step("chat once with a test image (VITask export, EP on)")
    sample = read_jsonl(Path(data_dir) / "test.jsonl")[0]
    image = Path(data_dir) / sample["image"]
    prompt = next(t["value"] for t in sample["conversations"] if t["from"] == "human").replace("<image>", "").strip()
    answer = chat_once(vitask_hf, image, prompt)
    echo(f"image: {image}\nuser: {prompt}\nassistant: {answer}\n(true label: {sample['conversations'][1]['value']})")

    step("Fig. 4: visual response ranking (own image vs another class's image), vanilla and VITask w/o EP")
    ranking = response_ranking_pairs({"vanilla": (vanilla_hf, None), "VITask w/o EP": (vitask_hf, first["vitask_model"])},
                                     data_dir, settings.eval_batch_size, seed)
    pngs = write_figures(out, first["reports"], first["tsm_metrics"], meta, name, vitask_work, vanilla_work, tsm_work)
    pngs.append(plot_ranking_panels(ranking, out / "fig4_response_ranking.png", f"generated {flag}"
                                    if name == "generated" else flag))
    pngs.append(plot_grad_norms({"VITask": scalars_of(vitask_work), "vanilla": scalars_of(vanilla_work)},
                                out / "grad_norm.png", stage2_start(len(read_jsonl(Path(data_dir) / "train.jsonl"))),
                                f"gradient norms before clipping, {name} {flag}"))
    first.pop("vitask_model")  # free it before the next seeds train

    per_seed = {seed: first["rows"]}
    for other in all_seeds[1:]:
        res = train_and_score(out / "seeds" / f"seed{other}", settings, flag, download, other, model_dir,
                              lambda t, o=other: step(t, f"seed {o}: "), echo)
        per_seed[other] = res["rows"]
        echo("\n" + results_table(res["rows"], f"seed {other}, {res['name']}"))
    rows = seed_rows(per_seed)
    result = {"rows": rows, "data": name, "wall_time_s": round(time.perf_counter() - started, 1),
              "flag": flag, "generated": name == "generated", "settings": asdict(settings), "seeds": all_seeds,
              "seed": seed, "chat": {"image": str(image), "prompt": prompt, "answer": answer},
              "response_ranking": {k: {"positive_mean": float(p.mean()), "negative_mean": float(n.mean()),
                                       "ranked_correctly": float((p > n).mean()), "n_pairs": len(p)}
                                   for k, (p, n) in ranking.items()},
              "protocol": PROTOCOL}
    results_path = write_json_atomic(out / "results.json", result)
    echo("\n" + results_table(rows, name))
    if len(all_seeds) > 1:
        echo(f"mean ± std over seeds {all_seeds}; " + paired_line(rows))
    else:
        echo("one seed: `--seeds 3` gives mean ± std and the per-seed difference (a single seed is noisy here)")
    if name == "generated":
        echo("(generated data: synthetic images in MedMNIST's layout, not real medical images)")
    echo(f"\nwall time {result['wall_time_s']:.0f} s\nresults: {results_path}\nfigures (seed {seed}): "
         + ", ".join(str(p) for p in pngs) + f"\nexports (seed {seed}): {vitask_hf}, {vanilla_hf}\nlogs: {out / 'logs'}")
    return result


def paired_line(rows):
    """The paper's central comparison per seed: VITask w/o EP minus the vanilla recipe, macro-F1."""
    import statistics

    by = {r["model"]: r["per_seed"] for r in rows}
    diffs = [by["vitask_no_ep"][s]["macro_f1"] - by["vanilla"][s]["macro_f1"] for s in by["vanilla"]]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return (f"VITask w/o EP - vanilla, macro-F1 per seed: {', '.join(f'{d:+.3f}' for d in diffs)} "
            f"(mean {statistics.mean(diffs):+.3f} ± {sd:.3f}, above in {sum(d > 0 for d in diffs)}/{len(diffs)})")


PROTOCOL = ("fair: both recipes train with their tiny config's own schedule (same optimizer steps, data order, "
            "lr, warm-up + cosine rule, LoRA), seed for weights and data order passed to both; selection: the last "
            "step for both; scored on the test split by likelihood ranking of the label names")


def stage2_start(n_train):
    """Index of the first stage-2 optimizer step of the tiny VITask config for ``n_train`` training records."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_file("vitask")))
    return cfg.stage1_epochs * -(-n_train // cfg.train_dataloader.batch_size)


def response_ranking_pairs(models, data_dir, batch_size=16, seed=0):
    """Fig. 4's numbers for each export: {label: (positive, negative)} mean response-token probabilities of the
    test records with their own image and with an image of another class (same draw for every model)."""
    from .analysis.response_ranking import response_ranking
    from .evaluation.evaluate import read_records
    from .export.folder import inspect_export
    from .inference.exports import data_meta, export_inputs, load_model

    test = Path(data_dir) / "test.jsonl"
    out = {}
    for label, (folder, model) in models.items():
        info = inspect_export(str(folder))
        model = model or load_model(info, use_ep=False)
        records = read_records(str(test), data_meta(info, str(test)))
        out[label] = response_ranking(model, export_inputs(info, model, False), records, str(Path(data_dir)),
                                      use_ep=False, batch_size=batch_size, seed=seed, progress=False)
    return out


def plot_ranking_panels(ranking, path, data_name):
    """Fig. 4 for several models side by side: density of the mean response probability, own vs other image."""
    import numpy as np

    from .evaluation.plots import _pyplot, _save_atomic

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ranking), figsize=(5 * len(ranking), 3.8), sharey=True, squeeze=False)
    try:
        bins = np.linspace(0, 1, 31)
        for ax, (label, (pos, neg)) in zip(axes[0], ranking.items()):
            for values, kind, colour in ((pos, "positive (own image)", "tab:blue"),
                                         (neg, "negative (other class's image)", "tab:red")):
                ax.hist(values, bins=bins, density=True, alpha=0.45, color=colour,
                        label=f"{kind}, mean {values.mean():.3f}")
            ax.set(xlabel="mean probability of the response tokens", xlim=(0, 1),
                   title=f"{label}: positive > negative in {100 * (pos > neg).mean():.0f}% of pairs")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("density")
        fig.suptitle(f"Visual response ranking (paper Fig. 4), test split, {data_name}", fontsize=10)
        fig.tight_layout()
        return _save_atomic(fig, str(path))
    finally:
        plt.close(fig)


def plot_grad_norms(curves, path, stage2_from, title):
    """Gradient norm before clipping per optimizer step, one line per run, the VITask stage switch marked."""
    from .evaluation.plots import _pyplot, _save_atomic

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    try:
        for name, records in curves.items():
            rows = [r for r in records if "grad_norm" in r]
            ax.plot(range(1, len(rows) + 1), [r["grad_norm"] for r in rows], lw=1, label=name)
        ax.axvline(stage2_from + 0.5, color="k", ls="--", lw=0.8, label="VITask stage 1 -> 2 (CRT on)")
        ax.set(xlabel="optimizer step", ylabel="gradient norm (clipped at 1 for the update)", yscale="log",
               title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save_atomic(fig, str(path))
    finally:
        plt.close(fig)


def write_figures(out, reports, tsm_metrics, meta, name, vitask_work, vanilla_work, tsm_work):
    """Confusion matrices (one per row) and the loss curves, in ``out``; returns their paths."""
    from .evaluation.plots import plot_confusion_matrix, plot_loss_curves

    tag = f"{meta['dataset']} ({'GENERATED' if name == 'generated' else 'MedMNIST'})"
    pngs = []
    for key, report in reports.items():
        task = next(iter(report["tasks"].values()))
        m = task["metrics"]
        if m.get("confusion_matrix") is None:  # multi-label sets have none
            continue
        pngs.append(plot_confusion_matrix(m["confusion_matrix"], task["label_names"], str(out / f"confusion_{key}.png"),
                                          title=f"{ROW_NAMES[key]}, {tag}: acc {m['accuracy']:.3f}"))
    if tsm_metrics.get("confusion_matrix") is not None:
        pngs.append(plot_confusion_matrix(tsm_metrics["confusion_matrix"], meta["label_names"],
                                          str(out / "confusion_tsm.png"),
                                          title=f"TSM, {tag}: acc {tsm_metrics['accuracy']:.3f}"))
    pngs.append(plot_training({"VITask": scalars_of(vitask_work), "vanilla": scalars_of(vanilla_work)},
                              out / "loss_curves.png", f"training losses, {tag}"))
    pngs.append(plot_loss_curves(str(tsm_work), str(out / "loss_curves_tsm.png"), title=f"TSM, {tag}"))
    return pngs
