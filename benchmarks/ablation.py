"""CPU-scale ablation of VITask (paper Table 2, Fig. 2, Fig. 5) on the tiny random-weight InternVL2.

    python benchmarks/ablation.py --seeds 3            # 33 training runs; ~40 min measured on a 2-core
                                                       # machine shared with other jobs
    python benchmarks/ablation.py --seeds 3 --only-seed 1   # one seed (run seeds side by side), then
    python benchmarks/ablation.py --seeds 3 --report-only   # the tables of everything cached
    python benchmarks/ablation.py --seeds 1 --quick    # smoke run

Per seed: a generated MedMNIST-layout set (seeded), one TSM (reused by every row of that seed),
then XTuner's train tool on the tiny configs for each row. Each run ends with the project's
eval hook pointed at the *test* split (likelihood ranking of the label names, with and without
EP); nothing is selected on it. Printed: mean +- std over seeds of accuracy and macro-F1 as
markdown tables. Finished runs are cached in OUT/seed<N>/runs.json, so an interrupted benchmark resumes;
--only-seed N runs one seed (seeds can run side by side in several processes), --report-only prints.

Rows (VITask config unless noted; "+both" is the full method, EP_cls):
  Table 2: base (L_van + L_EP, the paper's "Vanilla" row), +RDA, +CRT, +both, RDA* (+both, RDA undetached),
           each evaluated without and with EP.
  Fig. 2:  VLM (XTuner's vanilla InternVL2 LoRA recipe), VITask with EP_cls / EP_all / EP_rep (+both), TSM.
  Fig. 5:  vanilla recipe and VITask w/o EP trained on complete vs incomplete instructions.
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtuner_vitask import demo  # noqa: E402

VITASK_ROWS = {  # row -> extra --cfg-options of configs/vitask_tiny_cpu.py
    "base": ["model.use_rda=False", "model.use_crt=False"],
    "+RDA": ["model.use_rda=True", "model.use_crt=False"],
    "+CRT": ["model.use_rda=False", "model.use_crt=True"],
    "+both": [],
    "RDA*": ["model.detach_rda=False"],
    "EP_all": ["model.ep_mode=all"],
    "EP_rep": ["model.ep_mode=rep"],
}
TABLE2 = ("base", "+RDA", "+CRT", "+both", "RDA*")
# The demo's data and TSM, one stage-1 epoch less per run (30 runs must fit ~35 min on 2 cores;
# measured: EP is read by the LLM after ~3 stage-1 epochs of this set).
ABLATION = demo.FULL


def eval_on_test(data_dir, hook):
    """Options that make the end-of-run eval hook score the whole test split."""
    return [f"custom_hooks.{hook}.data_file={Path(data_dir) / 'test.jsonl'}", f"custom_hooks.{hook}.max_samples=None"]


def hook_metrics(work_dir):
    """The eval hook's last accuracy / macro-F1 (with and without EP) from mmengine's scalars."""
    from xtuner_vitask.evaluation.plots import read_scalars

    rows = [r for r in read_scalars(str(work_dir)) if any(k.startswith("val/") for k in r)]
    if not rows:
        raise RuntimeError(f"{work_dir}: no evaluation scalars")
    return {k[len("val/"):]: float(v) for k, v in rows[-1].items() if k.startswith("val/")}


def run_seed(seed, out, settings, cache, save, echo):
    """Every row for one seed; results go into ``cache[str(seed)]``."""
    done = cache.setdefault(str(seed), {})
    root = out / f"seed{seed}"
    quiet = None  # no per-step lines: one line per run is enough for a 30-run benchmark
    data = demo.make_data(root, settings.flag, n_per_split=settings.n_per_split, seed=seed)
    data_inc = demo.make_data(root, settings.flag, n_per_split=settings.n_per_split, seed=seed,
                              instruction_variant="incomplete")
    meta = demo.read_meta(data)
    model_dir = demo.build_vlm(out, settings.vlm_image_size)
    runs = root / "runs"

    def timed(name, fn):
        if name in done:
            return
        started = time.perf_counter()
        done[name] = fn()
        done[name]["seconds"] = round(time.perf_counter() - started, 1)
        save()
        echo(f"seed {seed} {name:<16} " + " ".join(f"{k}={v:.3f}" for k, v in done[name].items() if k != "seconds")
             + f"  ({done[name]['seconds']:.0f} s)")

    tsm_work = runs / "tsm"
    if not list(tsm_work.glob("best_macro_f1_epoch_*.pth")):
        demo.train("tsm", tsm_work, demo.tsm_options(data, len(meta["label_names"]), settings.tsm_epochs, seed),
                   "tsm", root / "logs", quiet)
    tsm_ckpt = demo.best_tsm_checkpoint(tsm_work)
    timed("tsm", lambda: {k: v for k, v in demo.tsm_test_metrics(tsm_ckpt, data).items() if k != "confusion_matrix"})

    def vitask(name, data_dir, extra):
        work = demo.train("vitask", runs / name, demo.vitask_options(
            model_dir, data_dir, tsm_ckpt, settings, seed,
            extra=[*extra, *eval_on_test(data_dir, 1), "default_hooks.checkpoint.save_last=False"]),
            f"{name}", root / "logs", quiet)
        result = hook_metrics(work)
        shutil.rmtree(work, ignore_errors=True)  # checkpoints are not needed
        return result

    def vanilla(name, data_dir):
        work = demo.train("vanilla", runs / name, demo.vanilla_options(
            model_dir, data_dir, settings, seed,
            extra=[*eval_on_test(data_dir, 0), "default_hooks.checkpoint.save_last=False"]),
            name, root / "logs", quiet)
        result = hook_metrics(work)
        shutil.rmtree(work, ignore_errors=True)
        return result

    for name, extra in VITASK_ROWS.items():
        timed(name, lambda: vitask(name, data, extra))
    timed("vlm", lambda: vanilla("vlm", data))
    timed("vlm_incomplete", lambda: vanilla("vlm_incomplete", data_inc))
    timed("+both_incomplete", lambda: vitask("+both_incomplete", data_inc, []))


def mean_std(values, n_seeds=None):
    """'mean ± std' (sample std; 0 for one value), with '(n=k)' when only k of the n_seeds seeds have the run."""
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    short = f" (n={len(values)})" if n_seeds and len(values) < n_seeds else ""
    return f"{statistics.mean(values):.3f} ± {sd:.3f}{short}"


def collect(cache, row, key):
    return [seed_rows[row][key] for seed_rows in cache.values() if row in seed_rows and key in seed_rows[row]]


def cell(cache, row, key):
    return mean_std(collect(cache, row, key), len(cache))


def tables(cache):
    """The three markdown tables (Table 2, Fig. 2, Fig. 5)."""
    n = len(cache)
    out = [f"Table 2 (CPU scale, {n} seed{'s' * (n != 1)}, test split, mean ± std)", "",
           "| row | acc w/o EP | macro-F1 w/o EP | acc w/ EP | macro-F1 w/ EP |", "|---|---:|---:|---:|---:|"]
    labels = {"base": "vanilla (L_van + L_EP)", "+RDA": "+RDA", "+CRT": "+CRT", "+both": "+both (VITask)",
              "RDA*": "+both, RDA* (undetached)"}
    for row in TABLE2:
        out.append(f"| {labels[row]} | " + " | ".join(cell(cache, row, k) for k in
                   ("accuracy_no_ep", "macro_f1_no_ep", "accuracy_ep", "macro_f1_ep")) + " |")
    out += ["", "Fig. 2 (EP modes; VITask rows trained with the full objective, evaluated with EP)", "",
            "| model | accuracy | macro-F1 |", "|---|---:|---:|"]
    fig2 = [("VLM (vanilla recipe)", "vlm", "no_ep"), ("VLM + EP_cls", "+both", "ep"),
            ("VLM + EP_all", "EP_all", "ep"), ("VLM + EP_rep", "EP_rep", "ep")]
    for label, row, suffix in fig2:
        out.append(f"| {label} | {cell(cache, row, 'accuracy_' + suffix)} | "
                   f"{cell(cache, row, 'macro_f1_' + suffix)} |")
    out.append(f"| TSM | {cell(cache, 'tsm', 'accuracy')} | {cell(cache, 'tsm', 'macro_f1')} |")
    out += ["", "Fig. 5 (incomplete instructions: no label list in the prompt; VITask evaluated w/o EP)", "",
            "| model | acc complete | macro-F1 complete | acc incomplete | macro-F1 incomplete |",
            "|---|---:|---:|---:|---:|"]
    for label, full, partial in (("vanilla recipe", "vlm", "vlm_incomplete"), ("VITask w/o EP", "+both", "+both_incomplete")):
        out.append(f"| {label} | {cell(cache, full, 'accuracy_no_ep')} | "
                   f"{cell(cache, full, 'macro_f1_no_ep')} | "
                   f"{cell(cache, partial, 'accuracy_no_ep')} | "
                   f"{cell(cache, partial, 'macro_f1_no_ep')} |")
    return "\n".join(out)


def load_seed(out, seed, key):
    """Finished runs of one seed (OUT/seed<N>/runs.json), or {} when absent or made with other settings."""
    path = out / f"seed{seed}" / "runs.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.pop("_settings", None) != key:
        print(f"{path} was made with other settings: ignored", file=sys.stderr)
        return {}
    return saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--only-seed", type=int, default=None,
                        help="run this one seed (several processes can run seeds side by side), then report")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (smoke run)")
    parser.add_argument("--flag", default=None, help="MedMNIST flag of the generated set (default: the demo's)")
    parser.add_argument("--out", default="work_dirs/ablation",
                        help="working folder (seed<N>/runs.json cache finished runs: an interrupted run resumes)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of the runs cached so far")
    args = parser.parse_args(argv)
    settings = demo.QUICK if args.quick else ABLATION
    if args.flag:
        settings = replace(settings, flag=args.flag)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key = repr(settings)
    cache = {str(seed): load_seed(out, seed, key) for seed in range(args.seeds)}

    started = time.perf_counter()
    todo = [] if args.report_only else [args.only_seed] if args.only_seed is not None else range(args.seeds)
    print(f"ablation: generated {settings.flag}, {settings.n_per_split} images, seeds {list(todo)} -> {out}",
          flush=True)
    for seed in todo:
        cache[str(seed)] = load_seed(out, seed, key)

        def save(seed=seed):
            demo.write_json_atomic(out / f"seed{seed}" / "runs.json", {"_settings": key, **cache[str(seed)]})

        run_seed(seed, out, settings, cache, save, lambda s: print(s, flush=True))
    print(f"\n{tables({k: v for k, v in cache.items() if v})}\n")
    print(f"settings: {settings}\nwall time {time.perf_counter() - started:.0f} s (cached runs not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
