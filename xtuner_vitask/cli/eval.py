"""Evaluate an exported model on a test JSONL: accuracy, macro-F1, per-class P/R/F1, confusion matrix."""
import os

from ..errors import VITaskError
from ..models.attention import add_cli_argument as add_attention_argument


def add_arguments(parser):
    parser.add_argument("model_dir", help="folder written by `xtuner convert pth_to_hf` (EP or plain variant)")
    parser.add_argument("--data", required=True, help="test JSONL written by data_tools (meta.json beside it)")
    ep = parser.add_mutually_exclusive_group()
    ep.add_argument("--ep", dest="use_ep", action="store_true", default=None,
                    help="exemplar prompting with the export's TSM (default when the export has one)")
    ep.add_argument("--no-ep", dest="use_ep", action="store_false", help="the VLM alone (what RDA trains for)")
    parser.add_argument("--mode", choices=("rank", "generate"), default="rank",
                        help="rank: likelihood of each label name (no parsing, fast); generate: greedy answers "
                             "parsed into labels (unparsable ones are counted)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generate mode: answer length (default: longest label name + 8 tokens)")
    parser.add_argument("--out", default=None,
                        help="output folder for eval.json and confusion_matrix.png "
                             "(default: eval_results/<model>/<data>_<mode>_<ep|no-ep>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    llava = parser.add_argument_group("LLaVA exports (XTuner's layout: projector/, llm_adapter/; rank mode)")
    llava.add_argument("--llm", default=None, help="the LLM folder the LLaVA model was trained from")
    llava.add_argument("--visual-encoder", default=None, help="its CLIP vision tower folder")
    llava.add_argument("--prompt-template", default="internlm2_chat", help="XTuner PROMPT_TEMPLATE name")
    add_attention_argument(parser)


# ---- argument checks shared by eval, chat and ranking-plot: before anything loads --------------------------------
def check_model_dir(path):
    """An export folder, or one clear line: a training checkpoint, a file or a missing folder."""
    if os.path.isfile(path) or (os.path.isdir(path) and path.rstrip("/").endswith(".pth")):
        raise VITaskError(f"{path} is a training checkpoint, not an exported model folder: export it first "
                          f"(xtuner convert pth_to_hf CONFIG {path} OUT_DIR) and pass OUT_DIR")
    if not os.path.isdir(path):
        raise VITaskError(f"model folder {path} does not exist: pass the folder written by `xtuner convert pth_to_hf`")


def check_data_file(path, option="--data"):
    if os.path.isdir(path):
        jsonl = sorted(f for f in os.listdir(path) if f.endswith(".jsonl"))
        example = os.path.join(path, jsonl[0] if jsonl else "test.jsonl")
        raise VITaskError(f"{option} {path} is a folder: pass one of its JSONL files (e.g. {example})")
    if not os.path.isfile(path):
        raise VITaskError(f"{option}: data file {path} does not exist: pass a JSONL written by data_tools")


def check_positive(option, value, none_ok=True):
    if value is None and none_ok:
        return
    if value is None or value < 1:
        raise VITaskError(f"{option} {value}: use a positive number" + (" (leave it out for all)" if none_ok else ""))


def default_out_dir(model_dir, data, mode, use_ep):
    split = os.path.splitext(os.path.basename(data))[0]
    model = os.path.basename(os.path.normpath(model_dir))
    return os.path.join("eval_results", model, f"{split}_{mode}_{'ep' if use_ep else 'no-ep'}")


def run(args):
    check_positive("--batch-size", args.batch_size, none_ok=False)
    check_positive("--max-samples", args.max_samples)
    check_positive("--max-new-tokens", args.max_new_tokens)
    check_model_dir(args.model_dir)
    check_data_file(args.data)
    from ..evaluation.evaluate import summary_lines, write_report
    from ..inference.exports import evaluate_export
    from ..inference.llava import evaluate_llava_export, is_llava_export

    if is_llava_export(args.model_dir):
        report = evaluate_llava_export(args.model_dir, args.data, args.llm, args.visual_encoder, use_ep=args.use_ep,
                                       mode=args.mode, batch_size=args.batch_size, max_samples=args.max_samples,
                                       progress=not args.no_progress, verbose=getattr(args, "verbose", False),
                                       attn_implementation=args.attn_implementation, template=args.prompt_template)
        out = args.out or default_out_dir(args.model_dir, args.data, args.mode, report["use_ep"])
        print("\n".join(summary_lines(report)))
        print("wrote " + ", ".join(write_report(report, out)))
        return 0
    report = evaluate_export(args.model_dir, args.data, use_ep=args.use_ep, mode=args.mode, batch_size=args.batch_size,
                             max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
                             progress=not args.no_progress, verbose=getattr(args, "verbose", False),
                             attn_implementation=args.attn_implementation)
    out = args.out or default_out_dir(args.model_dir, args.data, args.mode, report["use_ep"])
    written = write_report(report, out)
    print("\n".join(summary_lines(report)))
    print("wrote " + ", ".join(written))
    return 0
