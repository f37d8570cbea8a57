"""VITask^plug (paper Table 3): a copy of an EP export with a newly trained TSM swapped in, no VLM training."""
import json
import os
import shutil

from ..errors import VITaskError
from .folder import inspect_export
from .to_hf import check_output_folder, new_folder_beside, write_tsm_folder


def plug_tsm(model_dir, tsm_checkpoint, out_dir, tsm_config=None):
    """Copy ``model_dir`` to ``out_dir`` with its ``tsm/`` replaced by ``tsm_checkpoint``; returns the new
    TSM's record (``tsm/config.json``'s ``vitask_tsm``).

    Every file outside ``tsm/`` is copied byte for byte; the new TSM must give features of the
    size the connector was trained on. ``out_dir`` appears complete or not at all.
    """
    info = inspect_export(model_dir, need_ep=False)
    if not info.has_ep:
        raise VITaskError(f"{model_dir} is a plain export with no TSM to swap: plug needs the EP export "
                          "(`xtuner convert pth_to_hf` without --save-format official)")
    if not os.path.isfile(tsm_checkpoint):
        raise VITaskError(f"TSM checkpoint {tsm_checkpoint} does not exist: train the new TSM first "
                          "(xtuner train configs/tsm_*.py)")
    out_dir = os.path.abspath(out_dir)
    if os.path.abspath(model_dir) == out_dir:
        raise VITaskError("--out must differ from MODEL_DIR (plug writes a new folder)")
    check_output_folder(out_dir)
    tsm_sub = info.vitask.get("tsm_subfolder", "tsm")
    tmp = new_folder_beside(out_dir, ".tmp_plug_")
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
            config = json.load(f)
    except (OSError, ValueError):
        return "?"
    return (config.get("vitask_tsm") or {}).get("model_name") or config.get("architecture", "?")
