"""``xtuner-vitask make-tiny OUT_DIR``: write an InternVL2-compatible checkpoint with random weights (offline tests)."""
import time


def add_arguments(parser):
    from xtuner_vitask.testing.tiny_internvl import DEFAULT_LLM, LLM_FLAVOURS, PRESETS

    parser.description = (
        "Write a randomly initialised InternVL2-compatible checkpoint that loads with "
        "AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True) without network access: a tiny one "
        "(a few MB; --llm internlm2 carries InternVL2-2B's InternLM2 remote code and tokenizer), or with "
        "--preset a real architecture (internvl2-2b: 2.2 B parameters, 4.4 GB in bfloat16, written in shards)."
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    parser.add_argument("--llm", default=DEFAULT_LLM,
                        help=f"LLM of the tiny model: {', '.join(LLM_FLAVOURS)} (default {DEFAULT_LLM}, "
                             "InternVL2-2B/8B/26B's LLM)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a real architecture instead of the tiny one (random bfloat16 weights)")
    parser.add_argument("--template", default=None,
                        help="conversation template (default per LLM: internlm2-chat, Hermes-2, phi3-chat)")
    parser.add_argument("--image-size", type=int, default=64, help="tile size in pixels (default 64)")
    parser.add_argument("--patch-size", type=int, default=16, help="ViT patch size (default 16)")
    parser.add_argument("--max-dynamic-patch", type=int, default=6, help="max tiles per image (default 6)")
    parser.add_argument("--max-shard-size", default="1GB", help="--preset: weight shard size (default 1GB)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--pretrain", action="store_true",
                        help="then pretrain the tiny model (ViT, mlp1, LLM) into a small generalist on a generated "
                             "corpus of captioned coloured shapes, offline (a few CPU minutes; reused when OUT_DIR "
                             "already holds one made the same way); the demo's VLM")
    parser.add_argument("--llava", action="store_true",
                        help="a tiny LLaVA in XTuner's LLaVA recipes' layout instead: OUT_DIR/llm (InternLM2-chat "
                             "style), OUT_DIR/visual_encoder (CLIP), OUT_DIR/projector_pretrain.pth (56 px, patch 14)")


def run(args):
    from xtuner_vitask.testing.tiny_internvl import build_internvl2_preset, build_tiny_internvl, folder_size_mb

    start = time.perf_counter()
    if args.llava:
        from xtuner_vitask.testing.tiny_llava import build_tiny_llava

        folder, what = build_tiny_llava(args.out_dir, seed=args.seed, force=args.force), "llava"
    elif args.preset:  # raises VITaskError for bad input; main prints it
        folder = build_internvl2_preset(args.out_dir, preset=args.preset, seed=args.seed, force=args.force,
                                        max_shard_size=args.max_shard_size)
        what = args.preset
    elif args.pretrain:
        from pathlib import Path

        from xtuner_vitask.errors import VITaskError
        from xtuner_vitask.testing.pretrain import MARKER, build_pretrained_tiny

        if args.template is not None or args.max_dynamic_patch != 6 or args.seed != 0:
            raise VITaskError("--pretrain builds the default tiny model (--llm, --image-size, --patch-size only): "
                              "drop --template/--max-dynamic-patch/--seed")
        out = Path(args.out_dir)
        if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not args.force:
            raise VITaskError(f"{out} exists and is not a pretrained tiny model: choose another OUT_DIR or add --force")
        folder = build_pretrained_tiny(out, llm=args.llm, image_size=args.image_size, patch_size=args.patch_size)
        what = f"{args.llm}, pretrained"
    else:
        folder = build_tiny_internvl(
            args.out_dir,
            llm=args.llm,
            template=args.template,
            image_size=args.image_size,
            patch_size=args.patch_size,
            max_dynamic_patch=args.max_dynamic_patch,
            seed=args.seed,
            force=args.force,
        )
        what = args.llm
    print(f"wrote {folder} ({what}, {folder_size_mb(folder):.1f} MB, {time.perf_counter() - start:.1f} s)")
    return 0
