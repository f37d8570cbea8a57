"""Compute every image's TSM exemplar once and save them keyed by record id (for VITask training)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--tsm", required=True, help="TSM checkpoint (.pth saved by `xtuner train`; a quoted glob picks the newest match)")
    parser.add_argument("--config", default=None,
                        help="the TSM's training config, only for older TSM checkpoints that do not record their "
                             "timm arguments (default: the config stored in the checkpoint)")
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="data folder (all its split JSONLs) or a JSONL file; repeat for several")
    parser.add_argument("--out", required=True, help="cache file to write (e.g. work_dirs/exemplars_cls.pt)")
    parser.add_argument("--kind", choices=("cls", "all"), default="cls",
                        help="'cls': the CLS token per image (EP_cls); 'all': the patch tokens (EP_all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: cuda if available, else cpu)")


def run(args) -> int:
    from xtuner_vitask.tsm.exemplar_cache import cache_exemplars

    summary = cache_exemplars(args.tsm, args.data, args.out, kind=args.kind, config=args.config, device=args.device,
                              batch_size=args.batch_size, num_workers=args.num_workers)
    print(f"wrote {summary['out_file']}: {summary['n']} exemplars of shape {summary['shape'][1:]} "
          f"({args.kind}, TSM sha256 {summary['tsm_sha256'][:12]}...), {summary['images_per_s']:.1f} images/s")
    return 0
