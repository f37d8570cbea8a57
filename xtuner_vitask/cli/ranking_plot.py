"""Response-ranking plot (paper Fig. 4): density of response probabilities for positive vs negative image pairs."""
import json
import os

from .eval import check_data_file, check_model_dir, check_positive


def add_arguments(parser):
    parser.add_argument("model_dir", help="folder written by `xtuner convert pth_to_hf`")
    parser.add_argument("--data", required=True, help="JSONL written by data_tools (meta.json beside it)")
    parser.add_argument("--out", required=True, help="PNG to write (a .json with the numbers is written beside it)")
    ep = parser.add_mutually_exclusive_group()
    ep.add_argument("--ep", dest="use_ep", action="store_true", default=None,
                    help="exemplar prompting with the export's TSM (default when the export has one)")
    ep.add_argument("--no-ep", dest="use_ep", action="store_false", help="the VLM alone")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the negative-image draw")
    parser.add_argument("--title", default=None)
    from ..models.attention import add_cli_argument

    add_cli_argument(parser)


def run(args):
    check_positive("--batch-size", args.batch_size, none_ok=False)
    check_positive("--max-samples", args.max_samples)
    check_model_dir(args.model_dir)
    check_data_file(args.data)
    from ..analysis.response_ranking import plot_response_ranking, response_ranking
    from ..evaluation.evaluate import read_records
    from ..export.folder import inspect_export
    from ..inference.exports import data_meta, export_inputs, load_model

    info = inspect_export(args.model_dir, need_ep=bool(args.use_ep))
    use_ep = info.has_ep if args.use_ep is None else args.use_ep
    meta = data_meta(info, args.data)
    records = read_records(args.data, meta, args.max_samples)
    model = load_model(info, use_ep, getattr(args, "verbose", False), args.attn_implementation)
    pos, neg = response_ranking(model, export_inputs(info, model, use_ep), records,
                                os.path.dirname(os.path.abspath(args.data)), use_ep=use_ep,
                                batch_size=args.batch_size, seed=args.seed)
    title = args.title or f"{os.path.basename(os.path.normpath(args.model_dir))}{' + EP' if use_ep else ''}"
    plot_response_ranking(pos, neg, args.out, title=title)
    numbers = dict(positive=pos.tolist(), negative=neg.tolist(), use_ep=use_ep, n_pairs=len(pos),
                   positive_mean=float(pos.mean()), negative_mean=float(neg.mean()),
                   ranked_correctly=float((pos > neg).mean()))
    path = os.path.splitext(args.out)[0] + ".json"
    with open(path + ".tmp", "w", encoding="utf-8") as f:  # never a half-written file under the real name
        json.dump(numbers, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{len(pos)} pairs: mean response probability {pos.mean():.4f} (positive) vs {neg.mean():.4f} (negative); "
          f"positive > negative for {100 * numbers['ranked_correctly']:.1f}% of pairs; wrote {args.out}")
    return 0
