"""Evaluation speed: `rank` (likelihood of each label name) vs `generate` (greedy answer + parsing),
on the same export and test set, side by side, with their agreement.

    python benchmarks/bench_eval.py MODEL_DIR --data test.jsonl [--batch-size 8] [--ep/--no-ep] [--max-samples N]

The model is loaded once and every mode runs on it (a warm-up batch of each first, untimed). Rows:
rank as `xtuner-vitask eval` and the training-time eval hook run it (strategy "shared-prefix": the prompt
computed once), rank with one full sequence per candidate (strategy "full-sequence", the reference; both in
evaluation/ranking.py), and generate.
Columns: wall seconds, samples/s, accuracy, macro-F1, unparsable answers, accuracy on the samples
whose generated answer parsed (every mode on that same subset), and agreement with generate on it.
`--threads 1` (default) keeps timings stable on a busy machine. Goal (issue 6): rank >= 5x faster
at equal accuracy on parsable answers.
"""
import argparse
import json
import os
import sys

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None)
    ep = parser.add_mutually_exclusive_group()
    ep.add_argument("--ep", dest="use_ep", action="store_true", default=None)
    ep.add_argument("--no-ep", dest="use_ep", action="store_false")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    return parser.parse_args(argv)


def main(argv=None):
    import torch

    from xtuner_vitask.inference.exports import evaluate_export, load_model
    from xtuner_vitask.export.folder import inspect_export

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = inspect_export(args.model_dir, need_ep=bool(args.use_ep))
    use_ep = info.has_ep if args.use_ep is None else args.use_ep
    model = load_model(info, use_ep)
    common = dict(use_ep=use_ep, batch_size=args.batch_size, progress=False, model=model)
    runs = {"rank": dict(mode="rank"), "rank-full": dict(mode="rank", strategy="full-sequence"),
            "generate": dict(mode="generate")}
    for kwargs in runs.values():  # warm-up: first-call costs (allocations, lazy imports) are not timed
        evaluate_export(args.model_dir, args.data, max_samples=args.batch_size, **kwargs, **common)
    reports = {name: evaluate_export(args.model_dir, args.data, max_samples=args.max_samples, **kwargs, **common)
               for name, kwargs in runs.items()}

    gen = reports["generate"]["samples"]
    parsable = [i for i, s in enumerate(gen) if s["parsable"]]
    rows = []
    for name, report in reports.items():
        samples = report["samples"]
        acc_parsable = float(np.mean([samples[i]["correct"] for i in parsable])) if parsable else float("nan")
        agree = float(np.mean([sorted(samples[i]["prediction"]) == sorted(gen[i]["prediction"]) for i in parsable])) \
            if parsable else float("nan")
        rows.append(dict(mode=name, seconds=report["seconds"], samples_per_s=report["samples_per_second"],
                         accuracy=report["accuracy"], macro_f1=report["macro_f1"], unparsable=report["unparsable"],
                         accuracy_on_parsable=acc_parsable, agreement_with_generate=agree))
    speedup = reports["generate"]["seconds"] / max(reports["rank"]["seconds"], 1e-9)
    summary = dict(model=os.path.abspath(args.model_dir), data=os.path.abspath(args.data), n=reports["rank"]["n"],
                   use_ep=use_ep, batch_size=args.batch_size, threads=torch.get_num_threads(), rows=rows,
                   speedup_rank_vs_generate=speedup, n_parsable=len(parsable))

    print(f"{summary['n']} samples, batch {args.batch_size}, EP {'on' if use_ep else 'off'}, "
          f"torch threads {torch.get_num_threads()}, {model.model.device}")
    header = f"| {'mode':<9} | {'seconds':>8} | {'samples/s':>9} | {'accuracy':>8} | {'macro-F1':>8} | " \
             f"{'unparsable':>10} | {'acc. on parsable':>16} | {'agrees w/ generate':>18} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['mode']:<9} | {r['seconds']:>8.2f} | {r['samples_per_s']:>9.2f} | {r['accuracy']:>8.4f} | "
              f"{r['macro_f1']:>8.4f} | {r['unparsable']:>10d} | {r['accuracy_on_parsable']:>16.4f} | "
              f"{r['agreement_with_generate']:>18.1%} |")
    print(f"rank is {speedup:.2f}x as fast as generate ({len(parsable)} of {summary['n']} generated answers parsable)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
