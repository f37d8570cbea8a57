"""CPU-scale ablation of VITask on the demo's generated data (paper Table 2, Fig. 2, 3, 5, Table 3), with statistics.

    python benchmarks/ablation.py --seeds 3                 # everything, seeds one after the other
    python benchmarks/ablation.py --seeds 3 --only-seed 1   # one seed (run seeds side by side), then
    python benchmarks/ablation.py --seeds 3 --report-only   # tables, claims and PNGs of everything cached
    python benchmarks/ablation.py --seeds 1 --quick         # smoke run (the demo's --quick sizes)

The protocol (README "Fair protocol"): every VLM run is XTuner's train tool on configs/vitask_tiny_demo.py
or configs/internvl2_tiny_demo_lora.py with the configs' own schedule -- the same optimizer steps, data
order, learning rate, warm-up + cosine rule and LoRA for both recipes -- and only data, model and seed
passed in. Selection: the last step, for every run (no checkpoint is picked on any split). Each run ends
with the project's eval hook scoring the *test* split by likelihood ranking of the label names, with and
without EP. Per seed s: generated data (seed s), the pretrained tiny InternVL2 (shared), one TSM
(seed s), LoRA init and data order seed s.

Runs per seed (VITask config unless noted):
  vanilla          XTuner's vanilla InternVL2 LoRA recipe (the paper's "Vanilla" w/o EP, Fig. 2/3 "VLM")
  base             L_van + L_EP ("Vanilla" w/ EP)          +RDA / +CRT / +both   Table 2
  RDA*             +RDA with the exemplar side not detached (Fig. 3)
  RDA_fwd          +RDA with KL(EP || plain) instead of eq. 3's KL(plain || EP): not the paper, a diagnostic
  EP_all, EP_rep   +both with all TSM tokens / TSM tokens replacing the image tokens (Fig. 2)
  vanilla_inc, +both_inc   trained and tested with incomplete instructions (Fig. 5)
  +both_const      +both under the previous schedule (constant lr 2e-3, no warm-up/decay): stage-2 stability
  external         Table 3: a shifted "external" test set of the same classes; TSM, vanilla and VITask w/ EP
                   trained on the source set; VITask^plug = the VITask export with a TSM trained on the
                   external train split (`xtuner-vitask plug`), not trained again
Per claim: mean ± std over seeds and the paired difference (mean ± std, seeds won, one-sided paired t-test).
Finished runs are cached in OUT/seed<N>/runs.json, so an interrupted benchmark resumes.
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtuner_vitask import demo  # noqa: E402

VITASK_ROWS = {  # run -> extra --cfg-options of configs/vitask_tiny_demo.py
    "base": ["model.use_rda=False", "model.use_crt=False"],
    "+RDA": ["model.use_crt=False"],
    "+CRT": ["model.use_rda=False"],
    "+both": [],
    "RDA*": ["model.use_crt=False", "model.detach_rda=False"],
    # not a paper row: eq. 3's KL with its sides swapped, KL(EP || plain) (the diagnostics table)
    "RDA_fwd": ["model.use_crt=False", "model.rda_kl=forward"],
    "EP_all": ["model.ep_mode=all"],
    "EP_rep": ["model.ep_mode=rep"],
    # the schedule the tiny config had before (constant lr, no warm-up): the stage-2 stability comparison
    "+both_const": ["param_scheduler.0.start_factor=1.0", "param_scheduler.1.eta_min=None",
                    "param_scheduler.1.eta_min_ratio=1.0"],
}
ABLATION = demo.FULL
# every run of a seed, in the order they train ("tsm" is the TSM's own test score; "external" = Table 3)
RUNS = ("tsm", "vanilla", *VITASK_ROWS, "vanilla_inc", "+both_inc", "external")


def eval_on_test(data_dir, hook):
    """Options that make the end-of-run eval hook score the whole test split."""
    return [f"custom_hooks.{hook}.data_file={Path(data_dir) / 'test.jsonl'}", f"custom_hooks.{hook}.max_samples=None"]


def hook_metrics(work_dir):
    """The eval hook's last accuracy / macro-F1 (with and without EP) and the run's grad-norm curve."""
    from xtuner_vitask.evaluation.plots import read_scalars

    records = read_scalars(str(work_dir))
    rows = [r for r in records if any(k.startswith("val/") for k in r)]
    if not rows:
        raise RuntimeError(f"{work_dir}: no evaluation scalars")
    out = {k[len("val/"):]: float(v) for k, v in rows[-1].items() if k.startswith("val/")}
    out["grad_norm"] = [round(float(r["grad_norm"]), 4) for r in records if "grad_norm" in r]
    crt = [r["loss_crt"] for r in records if "loss_crt" in r]
    if crt:
        out["loss_crt_last"] = float(statistics.mean(crt[-10:]))
    return out


def run_seed(seed, out, settings, cache, save, echo, wanted=None):
    """Every run of one seed (or those in ``wanted``); results go into ``cache[str(seed)]``."""
    done = cache.setdefault(str(seed), {})
    root = out / f"seed{seed}"
    quiet = None  # one line per run is enough
    size = dict(n_per_split=settings.n_per_split, seed=seed, style=settings.data_style)
    data = demo.make_data(root, settings.flag, **size)
    wanted = set(RUNS if wanted is None else wanted) | {"tsm"}  # every run needs the TSM
    data_inc = demo.make_data(root, settings.flag, instruction_variant="incomplete", **size) if wanted & {
        "vanilla_inc", "+both_inc"} else None
    data_ext = demo.make_data(root, settings.flag, domain="external", **size) if "external" in wanted else None
    model_dir = demo.build_vlm(out, settings.vlm_image_size, pretrained=settings.pretrained, echo=echo)
    runs, logs = root / "runs", root / "logs"

    def timed(name, fn):
        if name in done or name not in wanted:
            return done.get(name)
        started = time.perf_counter()
        done[name] = fn()
        done[name]["seconds"] = round(time.perf_counter() - started, 1)
        save()
        echo(f"seed {seed} {name:<14} " + " ".join(f"{k}={v:.3f}" for k, v in done[name].items()
                                                     if isinstance(v, float) and k != "seconds")
             + f"  ({done[name]['seconds']:.0f} s)")
        return done[name]

    def tsm(name, data_dir):
        work = runs / name
        if not list(work.glob("best_macro_f1_epoch_*.pth")):
            demo.train("tsm", work, demo.tsm_options(data_dir, settings.tsm_epochs, seed), name, logs, quiet)
        return demo.best_tsm_checkpoint(work)

    tsm_ckpt = tsm("tsm", data)
    timed("tsm", lambda: {k: v for k, v in demo.tsm_test_metrics(tsm_ckpt, data).items() if k != "confusion_matrix"})

    def vitask(name, data_dir, extra, keep=False):
        opts = demo.vitask_options(model_dir, data_dir, tsm_ckpt, settings, seed,
                                   extra=[*extra, *eval_on_test(data_dir, 1)])
        work = demo.train("vitask", runs / name, opts, name, logs, quiet)
        result = hook_metrics(work)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)  # checkpoints are not needed
        return result

    def vanilla(name, data_dir, keep=False):
        opts = demo.vanilla_options(model_dir, data_dir, settings, seed, extra=eval_on_test(data_dir, 0))
        work = demo.train("vanilla", runs / name, opts, name, logs, quiet)
        result = hook_metrics(work)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        return result

    timed("vanilla", lambda: vanilla("vanilla", data, keep="external" in wanted))
    for name, extra in VITASK_ROWS.items():
        timed(name, lambda: vitask(name, data, extra, keep=name == "+both" and "external" in wanted))
    timed("vanilla_inc", lambda: vanilla("vanilla_inc", data_inc))
    timed("+both_inc", lambda: vitask("+both_inc", data_inc, []))
    timed("external", lambda: external(seed, root, settings, data, data_ext, tsm_ckpt, tsm("tsm_external", data_ext),
                                       model_dir, echo))


def external(seed, root, settings, data, data_ext, tsm_ckpt, tsm_ext, model_dir, echo):
    """Table 3 on the external test split: TSM, vanilla, VITask w/ EP, VITask^plug (macro-F1 and accuracy)."""
    from xtuner_vitask.export.plug import plug_tsm

    runs, logs, exports = root / "runs", root / "logs", root / "exports"
    v_opts = demo.vitask_options(model_dir, data, tsm_ckpt, settings, seed)
    n_opts = demo.vanilla_options(model_dir, data, settings, seed)
    vitask_hf = demo.export("vitask", demo.final_checkpoint(runs / "+both"), exports / "vitask", v_opts, "vitask",
                            logs, echo=None)
    vanilla_hf = demo.export("vanilla", demo.final_checkpoint(runs / "vanilla"), exports / "vanilla", n_opts,
                             "vanilla", logs, plain=True, echo=None)
    plug_dir = exports / "vitask_plug"
    shutil.rmtree(plug_dir, ignore_errors=True)
    plug_tsm(str(vitask_hf), str(tsm_ext), str(plug_dir))
    result = {}
    for key, (folder, use_ep) in {"vanilla": (vanilla_hf, False), "vitask_ep": (vitask_hf, True),
                                  "vitask_plug": (plug_dir, True)}.items():
        report = demo.evaluate(folder, data_ext, use_ep, root / "eval_external" / key, progress=False,
                               batch_size=settings.eval_batch_size)
        result[f"{key}_accuracy"], result[f"{key}_macro_f1"] = float(report["accuracy"]), float(report["macro_f1"])
    for key, ckpt in (("tsm", tsm_ckpt), ("tsm_external", tsm_ext)):
        m = demo.tsm_test_metrics(ckpt, data_ext)
        result[f"{key}_accuracy"], result[f"{key}_macro_f1"] = m["accuracy"], m["macro_f1"]
    for work in ("+both", "vanilla"):
        shutil.rmtree(runs / work, ignore_errors=True)
    shutil.rmtree(exports, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ statistics
def values(cache, run, key):
    """{seed: value} of ``key`` in ``run`` over the seeds that have it."""
    return {s: rows[run][key] for s, rows in cache.items() if run in rows and key in rows[run]}


def mean_std(vals, n_seeds=None):
    """'mean ± std' (sample std; 0 for one value), with '(n=k)' when only k of the n_seeds seeds have the run."""
    vals = list(vals)
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    short = f" (n={len(vals)})" if n_seeds and len(vals) < n_seeds else ""
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}{short}"


def cell(cache, run, key):
    return mean_std(values(cache, run, key).values(), len(cache))


def paired(a, b):
    """Paired comparison of {seed: value} dicts a - b: (mean, std, wins, n, one-sided p of a > b) or None."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    p = float("nan")
    if len(diffs) > 1:
        from scipy.stats import ttest_1samp

        p = float(ttest_1samp(diffs, 0.0, alternative="greater").pvalue) if sd > 0 else (
            0.0 if statistics.mean(diffs) > 0 else 1.0)
    return statistics.mean(diffs), sd, sum(d > 0 for d in diffs), len(diffs), p


# (claim id, paper source, sentence, A, B, metric, kind): A - B > 0 claimed ("gain"), or |A - B| small ("match")
CLAIMS = [
    ("main", "Table 1/2", "VITask w/o EP beats the vanilla recipe", ("+both", "macro_f1_no_ep"),
     ("vanilla", "macro_f1_no_ep"), "gain"),
    ("ep", "Table 1/2", "VITask w/ EP beats VITask w/o EP", ("+both", "macro_f1_ep"), ("+both", "macro_f1_no_ep"),
     "gain"),
    ("rda", "Table 2", "+RDA beats vanilla (w/o EP)", ("+RDA", "macro_f1_no_ep"), ("vanilla", "macro_f1_no_ep"),
     "gain"),
    ("crt", "Table 2", "+CRT beats vanilla (w/o EP)", ("+CRT", "macro_f1_no_ep"), ("vanilla", "macro_f1_no_ep"),
     "gain"),
    ("both>rda", "Table 2", "+both beats +RDA (w/o EP)", ("+both", "macro_f1_no_ep"), ("+RDA", "macro_f1_no_ep"),
     "gain"),
    ("both>crt", "Table 2", "+both beats +CRT (w/o EP)", ("+both", "macro_f1_no_ep"), ("+CRT", "macro_f1_no_ep"),
     "gain"),
    ("crt_ep", "Table 2", "+CRT still helps with EP (over L_van + L_EP)", ("+CRT", "macro_f1_ep"),
     ("base", "macro_f1_ep"), "gain"),
    ("cls>all", "Fig. 2", "EP_cls beats EP_all", ("+both", "macro_f1_ep"), ("EP_all", "macro_f1_ep"), "gain"),
    ("cls>rep", "Fig. 2", "EP_cls beats EP_rep", ("+both", "macro_f1_ep"), ("EP_rep", "macro_f1_ep"), "gain"),
    ("cls~tsm", "Fig. 2", "VLM + EP_cls matches the TSM (within 0.02 or above)", ("+both", "macro_f1_ep"),
     ("tsm", "macro_f1"), "match"),
    ("rda>rda*", "Fig. 3", "RDA (detached) beats RDA* (w/o EP)", ("+RDA", "macro_f1_no_ep"),
     ("RDA*", "macro_f1_no_ep"), "gain"),
    ("robust", "Fig. 5", "incomplete instructions cost VITask w/o EP less macro-F1 than the vanilla recipe",
     ("vanilla_drop", "value"), ("vitask_drop", "value"), "gain"),
    ("plug>ep", "Table 3", "VITask^plug beats VITask w/ EP on the external set", ("external", "vitask_plug_macro_f1"),
     ("external", "vitask_ep_macro_f1"), "gain"),
    ("plug>van", "Table 3", "VITask^plug beats the vanilla recipe on the external set",
     ("external", "vitask_plug_macro_f1"), ("external", "vanilla_macro_f1"), "gain"),
    ("stable", "stage 2", "the decaying schedule keeps stage-2 gradient norms below the constant-lr schedule's",
     ("+both_const", "stage2_grad_max"), ("+both", "stage2_grad_max"), "gain"),
]


# Not the paper's claims: comparisons that locate where the w/o-EP differences come from (same format, no verdict)
DIAGNOSTICS = [
    ("training with the EP pass (L_van + L_EP) vs the vanilla recipe, w/o EP", ("base", "macro_f1_no_ep"),
     ("vanilla", "macro_f1_no_ep")),
    ("RDA's own effect: +RDA vs L_van + L_EP, w/o EP", ("+RDA", "macro_f1_no_ep"), ("base", "macro_f1_no_ep")),
    ("CRT's own effect: +CRT vs L_van + L_EP, w/o EP", ("+CRT", "macro_f1_no_ep"), ("base", "macro_f1_no_ep")),
    ("RDA with KL(EP || plain) vs eq. 3's KL(plain || EP), w/o EP", ("RDA_fwd", "macro_f1_no_ep"),
     ("+RDA", "macro_f1_no_ep")),
]


def diff_cells(res):
    """'mean ± std | wins/n | p' of a ``paired`` result."""
    mean, sd, wins, n, p = res
    return f"{mean:+.3f} ± {sd:.3f} | {wins}/{n} | {p:.3f}"


def diagnostic_lines(cache):
    lines = ["| comparison (not a paper claim) | A − B, mean ± std | seeds A > B | p (one-sided) |", "|---|---:|---:|---:|"]
    for sentence, (ra, ka), (rb, kb) in DIAGNOSTICS:
        res = paired(values(cache, ra, ka), values(cache, rb, kb))
        if res is None:
            lines.append(f"| {sentence} | n/a | | |")
            continue
        lines.append(f"| {sentence} | {diff_cells(res)} |")
    return lines


def derived(cache, stage2_from):
    """Quantities the claims compare that no single run holds: Fig. 5 drops, stage-2 max gradient norms."""
    for rows in cache.values():
        if {"vanilla", "vanilla_inc"} <= set(rows):
            rows.setdefault("vanilla_drop", {})["value"] = (rows["vanilla"]["macro_f1_no_ep"]
                                                         - rows["vanilla_inc"]["macro_f1_no_ep"])
        if {"+both", "+both_inc"} <= set(rows):
            rows.setdefault("vitask_drop", {})["value"] = (rows["+both"]["macro_f1_no_ep"]
                                                        - rows["+both_inc"]["macro_f1_no_ep"])
        for run in ("+both", "+both_const", "+RDA"):
            if run in rows and rows[run].get("grad_norm"):
                rows[run]["stage2_grad_max"] = max(rows[run]["grad_norm"][stage2_from:])
    return cache


def claim_lines(cache):
    """One line per claim: the paired difference and the verdict."""
    lines = ["| claim (paper) | A − B, mean ± std | seeds A > B | p (one-sided) | verdict |", "|---|---:|---:|---:|---|"]
    verdicts = {}
    for cid, source, sentence, (ra, ka), (rb, kb), kind in CLAIMS:
        res = paired(values(cache, ra, ka), values(cache, rb, kb))
        if res is None:
            lines.append(f"| {sentence} ({source}) | n/a | | | not run |")
            continue
        mean, sd, wins, n, p = res
        if kind == "match":
            ok = mean > -0.02
        else:
            ok = mean > 0 and wins == n
        verdict = "reproduced" if ok else "not reproduced"
        if cid == "main":  # issue target: +0.05 or more, a margin larger than the seed spread of either arm
            arm_sd = max(statistics.stdev(v.values()) if len(v) > 1 else 0.0
                         for v in (values(cache, ra, ka), values(cache, rb, kb)))
            big = mean >= 0.05 and mean > arm_sd
            verdict += (f" (+0.05 target {'met' if big else 'not met'}: margin {mean:+.3f} vs the arms' seed "
                        f"std {arm_sd:.3f})")
        verdicts[cid] = verdict
        lines.append(f"| {sentence} ({source}) | {diff_cells(res)} | {verdict} |")
    return lines, verdicts


def tables(cache):
    """The markdown tables (Table 2, Fig. 2, Fig. 3, Fig. 5, Table 3) and the claims."""
    n = len(cache)
    out = [f"Table 2 (CPU scale, {n} seed{'s' * (n != 1)}, test split, macro-F1 / accuracy mean ± std)", "",
           "| row | acc w/o EP | macro-F1 w/o EP | acc w/ EP | macro-F1 w/ EP |", "|---|---:|---:|---:|---:|"]
    out.append(f"| vanilla recipe (no EP) | {cell(cache, 'vanilla', 'accuracy_no_ep')} | "
               f"{cell(cache, 'vanilla', 'macro_f1_no_ep')} | | |")
    labels = {"base": "L_van + L_EP", "+RDA": "+RDA", "+CRT": "+CRT", "+both": "+both (VITask)"}
    for row, label in labels.items():
        out.append(f"| {label} | " + " | ".join(cell(cache, row, k) for k in
                   ("accuracy_no_ep", "macro_f1_no_ep", "accuracy_ep", "macro_f1_ep")) + " |")
    out += ["", "Fig. 2 (EP modes, full objective, evaluated with EP) and Fig. 3 (RDA vs RDA*, evaluated w/o EP)", "",
            "| model | accuracy | macro-F1 |", "|---|---:|---:|"]
    for label, row, suffix in (("VLM (vanilla recipe)", "vanilla", "_no_ep"), ("VLM + EP_cls", "+both", "_ep"),
                               ("VLM + EP_all", "EP_all", "_ep"), ("VLM + EP_rep", "EP_rep", "_ep"),
                               ("TSM", "tsm", ""), ("VLM + RDA (w/o EP)", "+RDA", "_no_ep"),
                               ("VLM + RDA* (w/o EP)", "RDA*", "_no_ep"),
                               ("VLM + RDA, KL(EP || plain) (w/o EP; not the paper)", "RDA_fwd", "_no_ep")):
        out.append(f"| {label} | {cell(cache, row, 'accuracy' + suffix)} | {cell(cache, row, 'macro_f1' + suffix)} |")
    out += ["", "Fig. 5 (incomplete instructions: no label list in the prompt; evaluated w/o EP)", "",
            "| model | acc complete | macro-F1 complete | acc incomplete | macro-F1 incomplete |",
            "|---|---:|---:|---:|---:|"]
    for label, full, partial in (("vanilla recipe", "vanilla", "vanilla_inc"), ("VITask w/o EP", "+both", "+both_inc")):
        out.append(f"| {label} | " + " | ".join(cell(cache, r, k) for r, k in (
            (full, "accuracy_no_ep"), (full, "macro_f1_no_ep"), (partial, "accuracy_no_ep"),
            (partial, "macro_f1_no_ep"))) + " |")
    out += ["", "Table 3 (external test split: same classes, shifted acquisition; models trained on the source set)",
            "", "| model | accuracy | macro-F1 |", "|---|---:|---:|"]
    for label, key in (("TSM (source)", "tsm"), ("vanilla recipe", "vanilla"), ("VITask w/ EP", "vitask_ep"),
                       ("VITask^plug (TSM trained on the external set)", "vitask_plug"),
                       ("TSM trained on the external set (reference)", "tsm_external")):
        out.append(f"| {label} | {cell(cache, 'external', key + '_accuracy')} | "
                   f"{cell(cache, 'external', key + '_macro_f1')} |")
    out += ["", "Stage 2 (the last epoch): max gradient norm before clipping, and loss_crt at the end", "",
            "| schedule | max grad norm in stage 2 | loss_crt (last 10 steps) | macro-F1 w/o EP | macro-F1 w/ EP |",
            "|---|---:|---:|---:|---:|"]
    for label, run in (("constant lr 2e-3 (before)", "+both_const"), ("warm-up + cosine (configs now)", "+both"),
                       ("no CRT (+RDA), warm-up + cosine", "+RDA")):
        out.append(f"| {label} | {cell(cache, run, 'stage2_grad_max')} | {cell(cache, run, 'loss_crt_last')} | "
                   f"{cell(cache, run, 'macro_f1_no_ep')} | {cell(cache, run, 'macro_f1_ep')} |")
    lines, _ = claim_lines(cache)
    out += ["", "Claims (paired over seeds: A − B per seed; reproduced = A > B in every seed; 'match' = within 0.02)",
            "", *lines, "", "Diagnostics (paired over seeds, macro-F1)", "", *diagnostic_lines(cache),
            "", "Per seed, macro-F1 w/o EP (seeds " + ", ".join(sorted(cache, key=int)) + ")", "",
            *per_seed_lines(cache)]
    return "\n".join(out)


def per_seed_lines(cache):
    """One line per run: its macro-F1 w/o EP in every seed (the bimodality the README discusses)."""
    seeds = sorted(cache, key=int)
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for run in ("vanilla", "base", "+RDA", "+CRT", "+both", "RDA*", "RDA_fwd", "EP_all", "EP_rep", "+both_const"):
        vals = [cache[s].get(run, {}).get("macro_f1_no_ep") for s in seeds]
        if any(v is not None for v in vals):
            lines.append(f"| {run} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals) + " |")
    return lines


# ---------------------------------------------------------------------------------------------- figures
def plot_summary(cache, path):
    """One PNG: macro-F1 (mean ± std, one dot per seed) of the main rows of every experiment."""
    from xtuner_vitask.evaluation.plots import _pyplot, _save_atomic

    panels = [("Table 2: w/o EP", [("vanilla\nrecipe", "vanilla", "macro_f1_no_ep"),
                                  ("L_van+\nL_EP", "base", "macro_f1_no_ep"), ("+RDA", "+RDA", "macro_f1_no_ep"),
                                  ("+CRT", "+CRT", "macro_f1_no_ep"), ("+both", "+both", "macro_f1_no_ep")]),
              ("Table 2: w/ EP", [("L_van+\nL_EP", "base", "macro_f1_ep"), ("+RDA", "+RDA", "macro_f1_ep"),
                                 ("+CRT", "+CRT", "macro_f1_ep"), ("+both", "+both", "macro_f1_ep"),
                                 ("TSM", "tsm", "macro_f1")]),
              ("Fig. 2 / 3", [("EP_cls", "+both", "macro_f1_ep"), ("EP_all", "EP_all", "macro_f1_ep"),
                              ("EP_rep", "EP_rep", "macro_f1_ep"), ("RDA", "+RDA", "macro_f1_no_ep"),
                              ("RDA*", "RDA*", "macro_f1_no_ep"), ("RDA fwd\n(not paper)", "RDA_fwd", "macro_f1_no_ep")]),
              ("Fig. 5: incomplete instr.", [("vanilla", "vanilla_inc", "macro_f1_no_ep"),
                                             ("VITask\nw/o EP", "+both_inc", "macro_f1_no_ep")]),
              ("Table 3: external", [("TSM", "external", "tsm_macro_f1"), ("vanilla", "external", "vanilla_macro_f1"),
                                     ("VITask\nw/ EP", "external", "vitask_ep_macro_f1"),
                                     ("VITask\nplug", "external", "vitask_plug_macro_f1")])]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.8), sharey=True)
    try:
        for ax, (title, bars) in zip(axes, panels):
            for x, (label, run, key) in enumerate(bars):
                vals = list(values(cache, run, key).values())
                if not vals:
                    continue
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                ax.bar(x, statistics.mean(vals), yerr=sd, color="C1" if "w/ EP" in title else "C0", alpha=0.7,
                       capsize=3)
                ax.plot([x] * len(vals), vals, "k.", ms=4)
            ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 1)
        axes[0].set_ylabel("test macro-F1 (mean ± std, dots: seeds)")
        n = sorted(len(values(cache, run, key)) for _, bars in panels for _, run, key in bars if values(cache, run, key))
        seeds = f"{n[0]}-{n[-1]} seeds per bar" if n and n[0] != n[-1] else f"{len(cache)} seeds"
        fig.suptitle(f"VITask ablation at CPU scale (generated data, {seeds})", fontsize=10)
        fig.tight_layout()
        return _save_atomic(fig, str(path))
    finally:
        plt.close(fig)


def plot_grad_norms(cache, path, stage2_from):
    """Gradient norm (before clipping) per step: the previous constant-lr schedule vs the configs' schedule."""
    from xtuner_vitask.evaluation.plots import _pyplot, _save_atomic

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    try:
        for run, colour, label in (("+both_const", "C3", "constant lr 2e-3 (before)"),
                                   ("+both", "C0", "warm-up + cosine over both stages (now)")):
            for i, (seed, curve) in enumerate(sorted(values(cache, run, "grad_norm").items())):
                ax.plot(range(1, len(curve) + 1), curve, color=colour, lw=0.8, alpha=0.8,
                        label=label if i == 0 else None)
        ax.axvline(stage2_from + 0.5, color="k", ls="--", lw=0.8, label="stage 1 -> 2 (CRT on)")
        ax.set(yscale="log", xlabel="optimizer step", ylabel="gradient norm (before clipping at 1)",
               title="VITask (+both) gradient norms, every seed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save_atomic(fig, str(path))
    finally:
        plt.close(fig)


def stage2_start(settings):
    """Index of the first stage-2 step of the tiny VITask config for these settings' training split."""
    return demo.stage2_start(settings.n_per_split[0])


# ------------------------------------------------------------------------------------------------- main
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
    parser.add_argument("--out", default="work_dirs/ablation",
                        help="working folder (seed<N>/runs.json cache finished runs: an interrupted run resumes)")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="comma-separated runs per seed (default: all; e.g. vanilla,+both for the main claim)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of the runs cached so far")
    args = parser.parse_args(argv)
    settings = demo.QUICK if args.quick else ABLATION
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key = repr(settings)
    cache = {str(seed): load_seed(out, seed, key) for seed in range(args.seeds)}

    started = time.perf_counter()
    todo = [] if args.report_only else [args.only_seed] if args.only_seed is not None else range(args.seeds)
    print(f"ablation: generated {settings.flag} ({settings.data_style}), {settings.n_per_split} images, "
          f"seeds {list(todo)} -> {out}", flush=True)
    for seed in todo:
        cache[str(seed)] = load_seed(out, seed, key)

        def save(seed=seed):
            demo.write_json_atomic(out / f"seed{seed}" / "runs.json", {"_settings": key, **cache[str(seed)]})

        run_seed(seed, out, settings, cache, save, lambda s: print(s, flush=True), wanted=runs)
    cache = derived({k: v for k, v in cache.items() if v}, stage2_start(settings))
    print(f"\n{tables(cache)}\n")
    if cache:
        print(f"figures: {plot_summary(cache, out / 'ablation_summary.png')}, "
              f"{plot_grad_norms(cache, out / 'stage2_grad_norm.png', stage2_start(settings))}")
    print(f"settings: {settings}\nwall time {time.perf_counter() - started:.0f} s (cached runs not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
