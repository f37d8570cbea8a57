"""VITask^plug: a copy of an EP export with a newly trained TSM swapped in (no VLM training)."""
import json
import os
import shutil
import tempfile

from ..errors import VITaskError


def add_arguments(parser):
    parser.add_argument("model_dir", help="an EP export (`xtuner convert pth_to_hf` without --save-format official)")
    parser.add_argument("--tsm", required=True,
                        help="the new TSM's checkpoint (.pth saved by `xtuner train` of a TSM config)")
    parser.add_argument("--tsm-config", default=None,
                        help="the new TSM's training config (default: the one stored in its checkpoint)")
    parser.add_argument("--out", required=True, help="new model folder (must not exist or be empty)")


def plug_tsm(model_dir, tsm_checkpoint, out_dir, tsm_config=None):
    """Copy ``model_dir`` to ``out_dir`` with its ``tsm/`` replaced by ``tsm_checkpoint``; returns the new TSM spec.

    Every file outside ``tsm/`` is copied byte for byte; the new TSM must give features of the
    size the connector was trained on.
    """
    from ..export.folder import inspect_export
    from ..export.to_hf import write_tsm_folder

    info = inspect_export(model_dir, need_ep=False)
    if not info.has_ep:
        raise VITaskError(f"{model_dir} is a plain export with no TSM to swap: plug needs the EP export "
                          "(`xtuner convert pth_to_hf` without --save-format official)")
    if not os.path.isfile(tsm_checkpoint):
        raise VITaskError(f"TSM checkpoint {tsm_checkpoint} does not exist: train the new TSM first "
                          "(xtuner train configs/tsm_*.py)")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise VITaskError(f"{out_dir} exists and is not empty: pass a new output folder")
    if os.path.abspath(model_dir) == out_dir:
        raise VITaskError("--out must differ from MODEL_DIR (plug writes a new folder)")
    tsm_sub = info.vitask.get("tsm_subfolder", "tsm")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_plug_", dir=os.path.dirname(out_dir))
    try:
        spec = write_tsm_folder(tsm_checkpoint, os.path.join(tmp, tsm_sub), config=tsm_config,
                                feature_kind=info.vitask.get("feature_kind", "cls"))
        expected = int(info.vitask["exemplar_dim"])
        if spec["feature_dim"] != expected:
            raise VITaskError(f"the new TSM's features have size {spec['feature_dim']} but the model's connector takes "
                              f"{expected}: train the new TSM with a backbone of the same width "
                              f"(the old one: {_old_tsm_name(info)})")
        for name in os.listdir(model_dir):
            if name == tsm_sub:
                continue
            src, dst = os.path.join(model_dir, name), os.path.join(tmp, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return spec


def _old_tsm_name(info):
    try:
        with open(os.path.join(info.tsm_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_name", "?")
    except (OSError, ValueError):
        return "?"


def run(args):
    spec = plug_tsm(args.model_dir, args.tsm, args.out, args.tsm_config)
    print(f"wrote {args.out}: {args.model_dir} with the TSM {spec['model_name']} ({spec['num_classes']} classes, "
          f"{spec['feature_dim']}-d features, sha256 {spec['sha256'][:12]}) from {args.tsm}")
    return 0
