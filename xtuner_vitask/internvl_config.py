"""Reading an InternVL2 checkpoint's config (InternVLChatConfig through its remote code), with one clear
error for a missing or non-InternVL folder. Low in the house: models, datasets, export and evaluation read it."""
import os

from transformers import AutoConfig

from .errors import VITaskError


def load_internvl_config(model_path):
    """The checkpoint's InternVLChatConfig, or one clear error for a missing or non-InternVL folder."""
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    except (OSError, ValueError) as err:
        if not os.path.exists(model_path):
            raise VITaskError(
                f"model {model_path} is not a local folder and could not be fetched: download the InternVL2 "
                "checkpoint (huggingface-cli download OpenGVLab/InternVL2-2B --local-dir ...) and pass its folder"
            ) from None
        raise VITaskError(f"cannot read an InternVL2 config from {model_path}: {str(err).splitlines()[0]}") from None
    if not (hasattr(config, "llm_config") and hasattr(config, "vision_config")):
        raise VITaskError(
            f"{model_path} is not an InternVL2 checkpoint (model_type={getattr(config, 'model_type', '?')!r}, "
            "no llm_config/vision_config): pass an InternVL2 folder"
        )
    return config
