"""InternLM2 causal LM with the interface of the ``modeling_internlm2.py`` that InternVL2-2B/8B/26B ship.

Written for offline tests; what callers can observe is kept as in InternVL2's remote code:
- parameter names: ``model.tok_embeddings``, ``model.layers.N.attention.wqkv`` (q, k and v fused and
  grouped per key/value head: ``[q_1 .. q_g, k, v]`` for each of the ``num_key_value_heads`` groups),
  ``attention.wo``, ``feed_forward.w1/w2/w3`` (SwiGLU), ``attention_norm``, ``ffn_norm``, ``model.norm``,
  and the head ``output``;
- attention: ``eager`` or ``flash_attention_2``, chosen by ``config.attn_implementation`` (a plain config
  field). The classes declare ``_supports_flash_attn_2`` and not ``_supports_sdpa``, so transformers
  refuses ``attn_implementation="sdpa"``; without flash-attn the model switches itself to eager;
- key/value caches are legacy tuples, one ``(key, value)`` pair per layer, in and out; the classes declare
  no ``_supports_cache_class``, so ``generate`` hands them tuples too;
- gradient checkpointing is the reentrant ``torch.utils.checkpoint`` of ``self.gradient_checkpointing``;
- like InternLM2's file it needs ``einops`` installed.
"""
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config

try:  # flash-attn 2, as InternLM2's own code imports it
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    from flash_attn.bert_padding import pad_input, unpad_input

    has_flash_attn = True
except ImportError:
    has_flash_attn = False


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0 .. seq_len-1``; ``scaling`` = None, linear or dynamic NTK."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, scaling=None):
        super().__init__()
        self.dim, self.base, self.max_position_embeddings = dim, base, max_position_embeddings
        self.scaling_type = scaling["type"] if scaling else None
        self.scaling_factor = scaling["factor"] if scaling else 1.0
        self.register_buffer("inv_freq", self._inv_freq(base), persistent=False)
        self._cached_len = 0
        self._cos = self._sin = None

    def _inv_freq(self, base, device=None):
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def _build(self, seq_len, device):
        inv_freq = self.inv_freq.to(device)
        if self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            # NTK-aware: stretch the base so the longest position maps into the trained range
            ratio = self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)
            inv_freq = self._inv_freq(self.base * ratio ** (self.dim / (self.dim - 2)), device)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos, self._sin, self._cached_len = angles.cos(), angles.sin(), seq_len

    def forward(self, x, seq_len):
        length = max(seq_len, self.max_position_embeddings)
        if self._cos is None or self._cos.device != x.device or length > self._cached_len:
            self._build(length, x.device)
        return self._cos[:seq_len].to(x.dtype), self._sin[:seq_len].to(x.dtype)


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    """q, k: (B, heads, L, D); position_ids: (B, L) indices into the cos/sin tables."""
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def repeat_kv(states, n_rep):
    """(B, kv_heads, L, D) -> (B, kv_heads * n_rep, L, D), each key/value head serving its query group."""
    return states if n_rep == 1 else states.repeat_interleave(n_rep, dim=1)


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):
    """Grouped-query attention with the fused ``wqkv`` projection; eager softmax attention."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.is_causal = True
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        self.wqkv = nn.Linear(self.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=config.bias)
        self.rotary_emb = InternLM2RotaryEmbedding(self.head_dim, config.max_position_embeddings,
                                                   config.rope_theta, config.rope_scaling)

    def _project(self, hidden_states, position_ids, past_key_value, use_cache):
        """Queries (B, H, q, D) and the full keys/values (B, KV, kv, D) after the cache; the new cache."""
        batch, q_len, _ = hidden_states.shape
        group = self.num_key_value_groups + 2  # per key/value head: its queries, then the key, then the value
        qkv = rearrange(self.wqkv(hidden_states), "b l (kv g d) -> b l kv g d", g=group, d=self.head_dim)
        query = qkv[..., : self.num_key_value_groups, :].reshape(batch, q_len, self.num_heads, self.head_dim)
        key, value = qkv[..., -2, :], qkv[..., -1, :]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        past_len = past_key_value[0].shape[-2] if past_key_value is not None else 0
        cos, sin = self.rotary_emb(value, seq_len=past_len + q_len)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, position_ids)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        return query, key, value, ((key, value) if use_cache else None)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        batch, q_len, _ = hidden_states.shape
        query, key, value, present = self._project(hidden_states, position_ids, past_key_value, use_cache)
        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        weights = query @ key.transpose(2, 3) / math.sqrt(self.head_dim)
        if attention_mask is not None:  # additive (B, 1, q, kv)
            weights = weights + attention_mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out = (weights @ value).transpose(1, 2).reshape(batch, q_len, self.hidden_size)
        return self.wo(out), (weights if output_attentions else None), present


class InternLM2FlashAttention2(InternLM2Attention):
    """The same projections, attention by flash-attn 2 (CUDA, fp16/bf16); the mask is the 2-D padding mask."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        batch, q_len, _ = hidden_states.shape
        query, key, value, present = self._project(hidden_states, position_ids, past_key_value, use_cache)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # flash-attn wants (B, L, heads, D)
        causal = q_len != 1
        if attention_mask is None:
            out = flash_attn_func(query, key, value, 0.0, causal=causal)
        else:  # padded rows: run on the unpadded tokens (left padding, as generation pads)
            kv_len = key.shape[1]
            k_unpad, idx_k, cu_k, max_k = unpad_input(key, attention_mask)[:4]
            v_unpad = unpad_input(value, attention_mask)[0]
            q_unpad, idx_q, cu_q, max_q = unpad_input(query, attention_mask[:, kv_len - q_len:])[:4]
            out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                         max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0, causal=causal)
            out = pad_input(out, idx_q, batch, q_len)
        return self.wo(out.reshape(batch, q_len, self.hidden_size)), None, present


INTERNLM2_ATTENTION_CLASSES = {"eager": InternLM2Attention, "flash_attention_2": InternLM2FlashAttention2}


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention = INTERNLM2_ATTENTION_CLASSES[config.attn_implementation](config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        attended, weights, present = self.attention(self.attention_norm(hidden_states), attention_mask,
                                                    position_ids, past_key_value, output_attentions, use_cache)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn_2 = True  # and deliberately no _supports_sdpa / _supports_cache_class

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


def _additive_causal_mask(attention_mask, q_len, past_len, dtype, device):
    """(B, kv) 0/1 padding mask -> (B, 1, q, kv) additive mask: causal within the new tokens, padding hidden."""
    kv_len = past_len + q_len
    lowest = torch.finfo(dtype).min
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    causal = torch.arange(kv_len, device=device)[None, :] > query_pos  # (q, kv): True = masked
    masked = causal[None, None] | (attention_mask[:, None, None, :].to(device) == 0)
    return torch.zeros(masked.shape, dtype=dtype, device=device).masked_fill(masked, lowest)


class InternLM2Model(InternLM2PreTrainedModel):
    _auto_class = "AutoModel"

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.config = config
        if not has_flash_attn:
            config.attn_implementation = "eager"  # InternLM2's own fallback, whatever was asked
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = cfg.use_cache if use_cache is None else use_cache
        return_dict = cfg.use_return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)

        if cfg.attn_implementation == "flash_attention_2":
            # flash-attn takes the 2-D padding mask, and none at all when nothing is padded
            if attention_mask is not None and bool((attention_mask == 0).any()):
                mask = attention_mask
            else:
                mask = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones((batch, past_len + seq_len), dtype=torch.bool, device=device)
            mask = _additive_causal_mask(attention_mask, seq_len, past_len, inputs_embeds.dtype, device)

        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # a recomputed layer cannot hand out its cache
        hidden_states = inputs_embeds
        all_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        next_cache = () if use_cache else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_states += (hidden_states,)
            past = past_key_values[idx] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training:
                outputs = torch.utils.checkpoint.checkpoint(
                    lambda h, m, p, _layer=layer: _layer(h, m, p, None, output_attentions, False),
                    hidden_states, mask, position_ids, use_reentrant=True)
            else:
                outputs = layer(hidden_states, mask, position_ids, past, output_attentions, use_cache)
            hidden_states = outputs[0]
            if use_cache:
                next_cache += (outputs[-1],)
            if output_attentions:
                all_attentions += (outputs[1],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, next_cache, all_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=next_cache,
                                       hidden_states=all_states, attentions=all_attentions)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = ["output.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def set_decoder(self, decoder):
        self.model = decoder

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict)
        logits = self.output(outputs[0]).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, self.config.vocab_size),
                                   labels[..., 1:].reshape(-1).to(logits.device))
        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if past_key_values is not None:
            past_len = past_key_values[0][0].shape[2]
            # only the tokens the cache has not seen (just the last one when input_ids is shorter)
            keep_from = past_len if input_ids.shape[1] > past_len else input_ids.shape[1] - 1
            input_ids = input_ids[:, keep_from:]
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -input_ids.shape[1]:]
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(position_ids=position_ids, past_key_values=past_key_values,
                            use_cache=kwargs.get("use_cache"), attention_mask=attention_mask)
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer)
                     for layer in past_key_values)
