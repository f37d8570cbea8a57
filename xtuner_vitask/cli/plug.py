"""VITask^plug: a copy of an EP export with a newly trained TSM swapped in (no VLM training)."""


def add_arguments(parser):
    parser.add_argument("model_dir", help="an EP export (`xtuner convert pth_to_hf` without --save-format official)")
    parser.add_argument("--tsm", required=True,
                        help="the new TSM's checkpoint (.pth saved by `xtuner train` of a TSM config)")
    parser.add_argument("--tsm-config", default=None,
                        help="the new TSM's training config, only for older TSM checkpoints that do not record their "
                             "timm arguments (default: the config stored in the checkpoint)")
    parser.add_argument("--out", required=True, help="new model folder (must not exist or be empty)")


def run(args):
    from ..export.plug import plug_tsm

    record = plug_tsm(args.model_dir, args.tsm, args.out, args.tsm_config)
    print(f"wrote {args.out}: {args.model_dir} with the TSM {record['model_name']} ({record['num_classes']} classes, "
          f"{record['feature_dim']}-d features, sha256 {record['sha256'][:12]}) from {args.tsm}")
    return 0
