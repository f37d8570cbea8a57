"""What the plugin's two VLM wrappers (InternVL2, LLaVA) add alike to their XTuner base class: LoRA targets and
head resolved from the architecture, and a clear refusal of a VITask checkpoint under the vanilla config."""
import copy

from ..errors import VITaskError
from .lora import resolve_lora_config


class ConfigMismatchError(VITaskError, AttributeError):
    """A checkpoint's tensor has no place in the model the config builds (an AttributeError for ``hasattr``)."""


class PluginWrapperMixin:
    """Put before XTuner's model class (``class InternVL2(PluginWrapperMixin, InternVL_V1_5)``); the wrapper
    gives ``lora_llm()``, the LLM its LoRA goes on."""

    def _prepare_llm_for_lora(self, lora_config, use_activation_checkpointing=True):
        """XTuner's LoRA setup, after "auto" targets/head are resolved and every entry is checked against
        the LLM (before the first step, instead of peft's error or silence)."""
        lora_config = copy.deepcopy(lora_config)
        get = lora_config.get if isinstance(lora_config, dict) else lambda key: getattr(lora_config, key, None)
        targets, to_save = resolve_lora_config(self.lora_llm(), get("target_modules"), get("modules_to_save"))
        if isinstance(lora_config, dict):
            lora_config.update(target_modules=targets, modules_to_save=to_save)
        else:
            lora_config.target_modules, lora_config.modules_to_save = targets, to_save
        self.lora_target_modules, self.lora_modules_to_save = targets, to_save
        return super()._prepare_llm_for_lora(lora_config, use_activation_checkpointing)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "connector":
                raise
        # XTuner's pth_to_hf puts every tensor of the checkpoint into the model built from the config
        raise ConfigMismatchError(f"the checkpoint holds VITask's exemplar connector but the config builds the "
                                  f"vanilla {type(self).__name__}: convert it with the VITask config it was trained "
                                  "with (the copy in its work_dir)") from None
