"""Configuration of the tiny vision tower (stands in for InternViT).

Field names follow the ones InternVL tools read from ``config.vision_config``
(``image_size``, ``patch_size``, ``hidden_size``, ``num_hidden_layers`` ...).
"""
from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """A small ViT: patch convolution, CLS token, position embedding, pre-norm blocks."""

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels=3,
        patch_size=16,
        image_size=64,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu",
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        dropout=0.0,
        attention_dropout=0.0,
        drop_path_rate=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        use_flash_attn=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
            )
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.use_flash_attn = use_flash_attn
