"""InternViT with the interface of InternVL2's ``modeling_intern_vit.py``: ``InternVisionModel(pixel_values)``.

What callers observe is kept: module names (``embeddings.{class_embedding, patch_embedding,
position_embedding}``, ``encoder.layers.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2, ls1,
ls2}``), the output (CLS first; ``hidden_states[0]`` is the embedding output), the position embedding
resized to the input's patch grid, and gradient checkpointing switched ON by the encoder itself
(``self.gradient_checkpointing = True``, applied whenever the tower is in training mode) -- the class
does not declare ``supports_gradient_checkpointing``, so transformers' switches do not reach it.
Like InternVL's file it needs ``timm`` (DropPath) and ``einops`` installed, and uses flash-attn only
when it imports and ``use_flash_attn`` is set.
"""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.layers import DropPath
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_intern_vit import InternVisionConfig

try:
    from flash_attn import flash_attn_func

    has_flash_attn = True
except ImportError:
    has_flash_attn = False


class InternRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


NORM2FN = {"rms_norm": InternRMSNorm, "layer_norm": nn.LayerNorm}


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _grid_position_embedding(self, height, width):
        """The patch position embedding, bicubically resized from the trained grid to ``height x width``."""
        trained = self.image_size // self.patch_size
        table = self.position_embedding[:, 1:]
        grid = table.float().reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(table.dtype)

    def forward(self, pixel_values):
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values)  # (B, C, h, w)
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(dtype)
        positions = torch.cat([self.position_embedding[:, :1], self._grid_position_embedding(height, width)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        self.use_flash_attn = config.use_flash_attn and has_flash_attn
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = nn.Dropout(config.attention_dropout)
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _qkv(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b n h d", three=3, h=self.num_heads)
        if self.qk_normalization:  # over all heads at once
            q = self.q_norm(q.flatten(-2)).view(q.shape)
            k = self.k_norm(k.flatten(-2)).view(k.shape)
        return q, k, v

    def forward(self, hidden_states):
        batch, length, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states)
        if self.use_flash_attn:
            out = flash_attn_func(q, k, v, self.attn_drop.p if self.training else 0.0, causal=False)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
            weights = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            out = (weights @ v).transpose(1, 2)
        return self.proj_drop(self.proj(out.reshape(batch, length, self.embed_dim)))


class InternMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config, drop_path_rate):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = NORM2FN[config.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.norm2 = NORM2FN[config.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.drop_path1(self.attn(self.norm1(hidden_states)) * self.ls1)
        return hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()  # stochastic depth
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config, rate) for rate in rates])
        self.gradient_checkpointing = True  # InternViT's own choice: on unless someone switches it off

    def forward(self, inputs_embeds, output_hidden_states=None, return_dict=None):
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        states = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if output_hidden_states:
                states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, use_reentrant=True)
            else:
                hidden_states = layer(hidden_states)
        if output_hidden_states:
            states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states)


class InternVisionModel(PreTrainedModel):
    main_input_name = "pixel_values"
    config_class = InternVisionConfig
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, pixel_embeds=None):
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if pixel_values is None and pixel_embeds is None:
            raise ValueError("InternVisionModel needs pixel_values or pixel_embeds")
        if pixel_embeds is not None:
            hidden_states = pixel_embeds
        elif pixel_values.dim() == 4:
            hidden_states = self.embeddings(pixel_values)
        else:
            raise ValueError(f"pixel_values must be (tiles, 3, H, W), got shape {tuple(pixel_values.shape)}")
        encoded = self.encoder(inputs_embeds=hidden_states, output_hidden_states=output_hidden_states,
                               return_dict=True)
        last = encoded.last_hidden_state
        pooled = last[:, 0, :]
        if not return_dict:
            return (last, pooled) + ((encoded.hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                          hidden_states=encoded.hidden_states)
