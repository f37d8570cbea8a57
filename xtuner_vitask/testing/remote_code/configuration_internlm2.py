"""Configuration of the InternLM2 language model, as InternVL2-2B/8B/26B ship it (``model_type: internlm2``).

The fields the plugin and transformers read have InternLM2's names and defaults: ``bias`` (of the fused
``wqkv`` and ``wo``), ``rope_theta``/``rope_scaling`` (``linear`` or ``dynamic``), and the public
``attn_implementation`` field (``eager`` or ``flash_attention_2``) that InternLM2's own code reads --
not transformers' private ``_attn_implementation``.
"""
from transformers import PretrainedConfig

ROPE_SCALING_TYPES = ("linear", "dynamic")


class InternLM2Config(PretrainedConfig):
    """A Llama-like decoder: fused grouped ``wqkv``, SwiGLU ``w1/w2/w3``, RMSNorm, rotary positions."""

    model_type = "internlm2"
    _auto_class = "AutoConfig"

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=True,
        rope_theta=10000,
        rope_scaling=None,
        attn_implementation="eager",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # no value means one key/value head per query head (plain multi-head attention)
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        # Read by InternLM2's own attention dispatch; it is a plain field, so transformers never sees it.
        self.attn_implementation = attn_implementation or "eager"
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_rope_scaling(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or set(scaling) != {"type", "factor"}:
            raise ValueError(f"rope_scaling must be a dict with exactly 'type' and 'factor', got {scaling!r}")
        if scaling["type"] not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {scaling['type']!r}")
        if not isinstance(scaling["factor"], float) or scaling["factor"] < 1.0:
            raise ValueError(f"rope_scaling factor must be a float >= 1.0, got {scaling['factor']!r}")
