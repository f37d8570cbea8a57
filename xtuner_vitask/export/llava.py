"""VITask's EP parts of a LLaVA export, written beside XTuner's own LLaVA layout (``llm_adapter/``,
``projector/``; what ``xtuner chat --llava`` loads, and ignores the rest of): ``connector/`` (the exemplar
connector's weights + ``vitask.json``: feature size, EP mode, the tower's select layer, projector depth) and
``tsm/`` (the frozen TSM in timm's folder layout, as in InternVL2's EP export). ``xtuner-vitask eval`` loads
them with ``inference.llava``."""
import json
import os

import torch

CONNECTOR_DIR, TSM_DIR, SETTINGS_FILE = "connector", "tsm", "vitask.json"


def write_ep_parts(model, save_dir):
    """``connector/`` (weights + settings) and ``tsm/`` of a ``VITaskLLaVA``, beside XTuner's LLaVA layout."""
    from safetensors.torch import save_file

    from ..ep.exemplar_prompting import feature_kind
    from .to_hf import write_tsm_folder

    folder = os.path.join(save_dir, CONNECTOR_DIR)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.connector.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    settings = dict(exemplar_dim=model.connector.feature_dim, llm_hidden_size=model.llm_hidden_size,
                    ep_mode=model.ep_mode, visual_select_layer=model.visual_select_layer,
                    projector_depth=model.projector_depth)
    if model.tsm is not None:
        record = write_tsm_folder(model.tsm.checkpoint_path, os.path.join(save_dir, TSM_DIR),
                                  feature_kind=feature_kind(model.ep_mode))
        settings["tsm_sha256"] = record["sha256"]
    with open(os.path.join(folder, SETTINGS_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    return settings
