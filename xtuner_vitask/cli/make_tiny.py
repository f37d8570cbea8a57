"""``xtuner-vitask make-tiny OUT_DIR``: write a tiny InternVL2-compatible checkpoint for offline tests."""
import time


def add_arguments(parser):
    parser.description = (
        "Write a tiny, randomly initialised InternVL2-compatible checkpoint (a few MB) that loads "
        "with AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True) without network access."
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    parser.add_argument("--llm", default="qwen2", help="LLM class: qwen2 (default), phi3 or llama")
    parser.add_argument("--template", default=None,
                        help="conversation template (default per LLM: Hermes-2, phi3-chat, internlm2-chat)")
    parser.add_argument("--image-size", type=int, default=64, help="tile size in pixels (default 64)")
    parser.add_argument("--patch-size", type=int, default=16, help="ViT patch size (default 16)")
    parser.add_argument("--max-dynamic-patch", type=int, default=6, help="max tiles per image (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")


def run(args):
    from xtuner_vitask.testing.tiny_internvl import build_tiny_internvl, folder_size_mb

    start = time.perf_counter()
    folder = build_tiny_internvl(  # raises VITaskError for bad input; main prints it
        args.out_dir,
        llm=args.llm,
        template=args.template,
        image_size=args.image_size,
        patch_size=args.patch_size,
        max_dynamic_patch=args.max_dynamic_patch,
        seed=args.seed,
        force=args.force,
    )
    print(f"wrote {folder} ({args.llm}, {folder_size_mb(folder):.1f} MB, {time.perf_counter() - start:.1f} s)")
    return 0
