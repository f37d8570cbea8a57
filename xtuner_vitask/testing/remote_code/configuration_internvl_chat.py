"""Configuration of the InternVL2 chat model, with the fields of InternVL2's ``configuration_internvl_chat.py``.

``vision_config`` (InternViT), ``llm_config`` (the LLM config class named by its ``architectures[0]``:
InternLM2 from this folder, Llama, Qwen2 or Phi3 from transformers) and the image settings data pipelines
read: ``force_image_size``, ``downsample_ratio``, ``ps_version``, ``dynamic_image_size``, ``use_thumbnail``,
``min/max_dynamic_patch``, ``select_layer``, ``template``. There is no attention switch here: InternVL2's
model takes ``use_flash_attn`` as a keyword of ``from_pretrained``.
"""
import copy

from transformers import LlamaConfig, Phi3Config, PretrainedConfig, Qwen2Config

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

LLM_CONFIG_CLASSES = {
    "LlamaForCausalLM": LlamaConfig,
    "InternLM2ForCausalLM": InternLM2Config,
    "Phi3ForCausalLM": Phi3Config,
    "Qwen2ForCausalLM": Qwen2Config,
}


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
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
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        vision_config = {} if vision_config is None else vision_config
        llm_config = {"architectures": ["InternLM2ForCausalLM"]} if llm_config is None else llm_config
        self.vision_config = InternVisionConfig(**vision_config)
        architecture = llm_config["architectures"][0]
        if architecture not in LLM_CONFIG_CLASSES:
            raise ValueError(f"Unsupported architecture: {architecture}")
        self.llm_config = LLM_CONFIG_CLASSES[architecture](**llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version  # pixel shuffle version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        """Every attribute, with the two nested configs as dicts of their own."""
        output = copy.deepcopy(self.__dict__)
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output
