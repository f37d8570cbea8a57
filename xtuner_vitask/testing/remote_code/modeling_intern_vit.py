"""A small ViT with InternViT's interface: ``InternVisionModel(pixel_values)``.

Patch convolution + CLS token + learned position embedding, then pre-norm
transformer blocks with layer scale. The output is a HF vision output
(``last_hidden_state``, ``pooler_output``, ``hidden_states``), CLS first.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_intern_vit import InternVisionConfig


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, config.hidden_size))

    def _patch_position_embedding(self, height, width):
        """Position embedding of the patch grid, resized when the image size differs from training."""
        patch_pos = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return patch_pos
        hidden = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid, self.grid, hidden).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        return grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, height * width, hidden)

    def forward(self, pixel_values):
        weight_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(weight_dtype))  # B, C, h, w
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, -1, -1).to(weight_dtype)
        cls = cls + self.position_embedding[:, :1]
        patches = patches + self._patch_position_embedding(height, width)
        return torch.cat([cls, patches], dim=1)


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        batch, length, hidden = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, heads, L, d
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(attended.transpose(1, 2).reshape(batch, length, hidden))


class InternMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = InternMLP(config)
        # Per-channel layer scale on each residual branch, as InternViT has.
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.dropout(self.attn(self.norm1(hidden_states)) * self.ls1)
        return hidden_states + self.dropout(self.mlp(self.norm2(hidden_states)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, output_hidden_states=False, return_dict=True):
        all_states = (inputs_embeds,) if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states)
            else:
                hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, all_states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_states)


class InternVisionModel(PreTrainedModel):
    """The vision tower; ``hidden_states[0]`` is the embedding output, ``[-1]`` the last block."""

    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, InternVisionEmbeddings):
            module.class_embedding.data.normal_(mean=0.0, std=std)
            module.position_embedding.data.normal_(mean=0.0, std=std)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, pixel_embeds=None):
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if pixel_values is None and pixel_embeds is None:
            raise ValueError("InternVisionModel needs pixel_values (or pixel_embeds)")
        embeds = pixel_embeds if pixel_embeds is not None else self.embeddings(pixel_values)
        encoded = self.encoder(embeds, output_hidden_states=output_hidden_states, return_dict=True)
        last = encoded.last_hidden_state
        pooled = last[:, 0, :]
        if not return_dict:
            return (last, pooled) + ((encoded.hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=pooled, hidden_states=encoded.hidden_states
        )
