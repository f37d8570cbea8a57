"""Chat about an image with an exported model (interactive, like `xtuner chat`; --prompt for one answer)."""
import os
import sys

from .eval import check_model_dir, check_positive

EXIT_WORDS = ("exit", "quit")


def add_arguments(parser):
    parser.add_argument("model_dir", help="folder written by `xtuner convert pth_to_hf` (or any InternVL2 folder)")
    parser.add_argument("--image", required=True, help="image file to talk about")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit (for scripts)")
    parser.add_argument("--prompt-template", default=None,
                        help="chat format: an InternVL template name (Hermes-2, internlm2-chat, phi3-chat, "
                             "internvl2_5) or an XTuner PROMPT_TEMPLATE name (default: config.json's template)")
    parser.add_argument("--system", default=None, help="system text (default: the template's, as in training)")
    ep = parser.add_mutually_exclusive_group()
    ep.add_argument("--ep", dest="use_ep", action="store_true", default=None,
                    help="exemplar prompting with the export's TSM (default when the export has one)")
    ep.add_argument("--no-ep", dest="use_ep", action="store_false", help="the VLM alone")
    parser.add_argument("--max-tiles", type=int, default=1, help="image tiles (1 = as VITask trains)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-streamer", action="store_true", help="print each answer when complete")
    parser.add_argument("--seed", type=int, default=0)
    from ..models.attention import add_cli_argument

    add_cli_argument(parser)


def get_input():
    """Lines until an empty one (as `xtuner chat`)."""
    print("\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> ", end="", flush=True)
    return "\n".join(iter(input, ""))


def run(args):
    from ..evaluation.inputs import check_image_file
    from ..inference.chat import IMAGE_HINT

    check_image_file(args.image, IMAGE_HINT)  # before the model loads
    check_model_dir(args.model_dir)
    check_positive("--max-tiles", args.max_tiles, none_ok=False)
    check_positive("--max-new-tokens", args.max_new_tokens, none_ok=False)
    import torch
    from transformers import TextStreamer

    from ..inference.chat import ChatSession

    torch.manual_seed(args.seed)
    session = ChatSession(args.model_dir, args.image, args.prompt_template, args.system, args.use_ep, args.max_tiles,
                          args.attn_implementation)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               repetition_penalty=args.repetition_penalty)
    if args.prompt is not None:
        print(session.ask(args.prompt, **gen))
        return 0
    streamer = None if args.no_streamer else TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"chatting with {os.path.basename(os.path.normpath(args.model_dir))} about {args.image} "
          f"(EP {'on' if session.use_ep else 'off'})")
    while True:
        try:
            text = get_input()
        except EOFError:
            print()
            return 0
        if text.strip().lower() in EXIT_WORDS:
            print("Log: Exit!")
            return 0
        if text.strip() == "RESET":
            session.reset()
            print("Log: History responses have been removed!")
            continue
        if not text.strip():
            continue
        answer = session.ask(text, streamer=streamer, **gen)
        if streamer is None:
            print(answer)
        sys.stdout.flush()
