"""Compute every image's TSM exemplar once and save them keyed by record id (for VITask training)."""
from __future__ import annotations

import os

from xtuner_vitask.contract import META_FILE
from xtuner_vitask.errors import VITaskError


def add_arguments(parser):
    parser.add_argument("--tsm", required=True, help="TSM checkpoint (.pth saved by `xtuner train`; a quoted glob picks the newest match)")
    parser.add_argument("--config", default=None,
                        help="the TSM's training config (default: the config stored in the checkpoint)")
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="data folder (all its split JSONLs) or a JSONL file; repeat for several")
    parser.add_argument("--out", required=True, help="cache file to write (e.g. work_dirs/exemplars_cls.pt)")
    parser.add_argument("--kind", choices=("cls", "all"), default="cls",
                        help="'cls': the CLS token per image (EP_cls); 'all': the patch tokens (EP_all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: cuda if available, else cpu)")


def run(args) -> int:
    import torch

    from xtuner_vitask.models.exemplar_cache import build_exemplar_cache
    from xtuner_vitask.models.tsm import check_tsm_matches_meta, load_tsm, resolve_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tsm = load_tsm(resolve_checkpoint(args.tsm), config=args.config, device=device)
    for src in args.data:  # a TSM of another data set would give meaningless exemplars
        folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        meta = os.path.join(folder, META_FILE)
        if os.path.isfile(meta):
            check_tsm_matches_meta(tsm, meta)
        elif os.path.isdir(src):
            raise VITaskError(f"{src} has no meta.json: pass a folder written by data_tools")
    summary = build_exemplar_cache(tsm, args.data, args.out, kind=args.kind, batch_size=args.batch_size,
                                   num_workers=args.num_workers)
    print(f"wrote {summary['out_file']}: {summary['n']} exemplars of shape {summary['shape'][1:]} "
          f"({args.kind}, TSM sha256 {tsm.sha256[:12]}...), {summary['images_per_s']:.1f} images/s")
    return 0
