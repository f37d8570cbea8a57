"""Configuration of the tiny InternVL2-compatible chat model.

Same fields as InternVL2's ``InternVLChatConfig``: a ``vision_config``, an
``llm_config`` (a plain transformers config chosen by its ``architectures``
entry), and the image-tiling settings that data pipelines read
(``force_image_size``, ``downsample_ratio``, ``min/max_dynamic_patch``,
``use_thumbnail``, ``template``, ``ps_version``, ``select_layer``).
"""
import copy

from transformers import AutoConfig, LlamaConfig, Phi3Config, PretrainedConfig, Qwen2Config

from .configuration_intern_vit import InternVisionConfig

# LLM classes this checkpoint format knows by name; anything else is looked up
# through its ``model_type`` in transformers' own registry.
LLM_CONFIG_CLASSES = {
    "LlamaForCausalLM": LlamaConfig,
    "Qwen2ForCausalLM": Qwen2Config,
    "Phi3ForCausalLM": Phi3Config,
}


def _llm_config_from_dict(llm_config):
    llm_config = copy.deepcopy(llm_config)
    architectures = llm_config.get("architectures") or ["Qwen2ForCausalLM"]
    llm_config["architectures"] = architectures
    config_class = LLM_CONFIG_CLASSES.get(architectures[0])
    if config_class is not None:
        llm_config.pop("model_type", None)
        return config_class(**llm_config)
    if "model_type" in llm_config:
        return AutoConfig.for_model(**llm_config)
    raise ValueError(
        f"llm_config: unsupported architecture {architectures[0]!r}; "
        f"use one of {sorted(LLM_CONFIG_CLASSES)} or give a model_type"
    )


class InternVLChatConfig(PretrainedConfig):
    """Vision tower + MLP projector + causal LM, in InternVL2's config layout."""

    model_type = "internvl_chat"
    _auto_class = "AutoConfig"  # save_pretrained copies the code and writes auto_map
    # Serialize the nested configs in full (a diff against defaults would drop
    # fields such as the LLM's model_type).
    is_composition = True

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v2",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        use_flash_attn=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if vision_config is None:
            vision_config = {}
        if llm_config is None:
            llm_config = {}
        self.vision_config = (
            vision_config
            if isinstance(vision_config, InternVisionConfig)
            else InternVisionConfig(**vision_config)
        )
        self.llm_config = (
            llm_config if isinstance(llm_config, PretrainedConfig) else _llm_config_from_dict(llm_config)
        )
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.use_flash_attn = use_flash_attn

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        # Runtime-only bookkeeping of transformers' attention dispatch is not saved.
        for block in (output, output["vision_config"], output["llm_config"]):
            block.pop("_attn_implementation_autoset", None)
        for nested in (output["vision_config"], output["llm_config"]):
            nested.pop("transformers_version", None)
        return output
