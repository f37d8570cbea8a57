"""One computation of the prefix that the passes of a VITask step share.

A training step of VITask runs the LLM on up to three sequences per sample: plain (image +
instruction + response), exemplar-prompted (EP: the same with TSM tokens spliced in) and, in stage 2,
the CRT negative (the same tokens with another image). They are equal up to a point:

    root   = tokens before the first image token (system text, ``<img>``): shared by all three;
    trunk  = root + the image tokens, up to where EP_cls / EP_all insert: shared by plain and EP
             (EP_rep replaces the image tokens, so its trunk is the root).

Here the plain pass runs in full and keeps its keys/values (per layer, with their autograd graph);
the EP pass runs only its suffix, on the plain pass's first ``trunk`` positions as cache, and the
negative only its suffix, on the first ``root`` positions: as many decoder calls as full passes, with
LLM work L + S_ep (+ L - root) instead of 2L (+ L). It is an exact rewrite of full passes (causal
attention: a prefix's keys/values do not depend on what follows), and the gradients of every suffix
reach the shared tokens through the keys/values. Losses and gradients equal those of full passes up
to float summation order (tests/test_shared_prefix.py).

Peak memory: with RDA's teacher detached (the paper's RDA), the EP pass is coupled to nothing but
the shared trunk. Its gradient is taken at once (``torch.autograd.grad`` w.r.t. the trainable
parameters and the trunk's keys/values, which it sees as detached leaves), its activations are
freed, and that gradient rides on ``loss_ep`` into the step's one backward (a value-0 carrier whose
backward hands each tensor its precomputed gradient times the incoming scale). So the step still
has ONE backward: mmengine's OptimWrapper (loss scaling, ``accumulative_counts``), DeepSpeed's
engine and ZeRO hooks, and DDP's reducer see exactly what they saw before, while the EP pass's
activations are gone before the negative pass runs. With activation checkpointing the EP pass keeps
only its layer inputs, less than the trunk's key/value gradient: then it is backpropagated with the
rest, and the plain pass's keys/values (kept for the suffixes) are what sharing adds to memory. (mmengine's DDP and DeepSpeed wrappers call their
own ``train_step``, never the model's, so an override of ``train_step`` with two backwards would not
reach them; this keeps the change inside ``forward``.)

Caches: transformers models (Qwen2, Llama, Phi3) take ``Cache`` objects; InternVL2's InternLM2
remote code takes and returns legacy ``((k, v), ...)`` tuples. ``PrefixKV`` is a stateless Cache:
``update`` returns the prefix concatenated with the new keys/values and never appends, so running a
layer twice (activation checkpointing recomputes it in backward) gives the same tensors.

Activation checkpointing: InternLM2's remote code passes ``past_key_value=None`` to checkpointed
layers and both it and transformers switch ``use_cache`` off under checkpointing; their reentrant
``torch.utils.checkpoint`` (transformers 4.48's default) also passes no gradient to tensors that
reach a layer inside a cache, nor supports ``autograd.grad``. So while the shared passes run, the
decoder's own checkpointing is off and each decoder layer is wrapped in non-reentrant
``torch.utils.checkpoint`` instead: the same recompute-in-backward memory trade.

Flash-attention 2: a suffix of S queries on P + S keys needs the causal mask aligned bottom-right,
which flash-attn >= 2.1 does (``flash_attn_func(causal=True)``; with padding, transformers' and
InternLM2's ``_upad_input`` unpad the queries with the last S mask columns, right padding included);
older flash-attn aligns top-left, so sharing falls back there. Untested on a GPU (no GPU was
available): written to the code of transformers 4.48's ``_flash_attention_forward`` and InternLM2's
``InternLM2FlashAttention2``.
"""
import contextlib
import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from . import losses

_logged = set()


def _warn(message):
    from mmengine.logging import print_log

    print_log(message, logger="current", level=logging.WARNING)


def log_once(message):
    """Warn once per process about a combination that cannot share (or cannot split the EP backward)."""
    if message not in _logged:
        _logged.add(message)
        _warn(message)


# ---- caches ------------------------------------------------------------------------------------
class PrefixKV(Cache):
    """A transformers ``Cache`` over a shared prefix's per-layer (key, value), stateless.

    ``update`` returns prefix + new along the sequence axis and records it in ``present`` (overwritten,
    never appended), so a layer recomputed by activation checkpointing sees the same keys/values.
    """

    def __init__(self, past, num_layers):
        super().__init__()
        self.past = past
        self.present = [None] * num_layers

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.past is not None:
            key_states = torch.cat([self.past[layer_idx][0], key_states], dim=-2)
            value_states = torch.cat([self.past[layer_idx][1], value_states], dim=-2)
        self.present[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx=0):
        return 0 if self.past is None else self.past[layer_idx][0].shape[-2]

    def get_max_cache_shape(self):
        return None


class DecoderRunner:
    """Runs the LLM's decoder body on a segment on top of a prefix's keys/values.

    Returns the last hidden state of the segment and the per-layer (key, value) of prefix + segment
    (with their graph), whatever cache format the decoder speaks.
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self.legacy = not getattr(decoder, "_supports_cache_class", False)  # InternLM2 remote code

    def __call__(self, embeds, attention_mask, position_ids, past=None):
        common = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, return_dict=True)
        if self.legacy:
            out = self.decoder(past_key_values=None if past is None else tuple(past), **common)
            return out.last_hidden_state, [tuple(layer) for layer in out.past_key_values]
        cache = PrefixKV(past, len(self.decoder.layers))
        out = self.decoder(past_key_values=cache, **common)
        return out.last_hidden_state, cache.present


@contextlib.contextmanager
def layerwise_checkpointing(decoder):
    """While the block runs: the decoder's own activation checkpointing off, each layer wrapped in
    non-reentrant ``torch.utils.checkpoint`` (caches pass through it, gradients reach them)."""
    if not (getattr(decoder, "gradient_checkpointing", False) and decoder.training and torch.is_grad_enabled()):
        yield
        return
    layers = list(decoder.layers)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (hooks) to restore
    decoder.gradient_checkpointing = False
    try:
        for layer in layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        yield
    finally:
        decoder.gradient_checkpointing = True
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


# ---- when sharing applies ------------------------------------------------------------------------
def unsupported_reason(model):
    """Why this model's LLM cannot run suffixes on a shared prefix, or None when it can."""
    decoder, _ = model.decoder_and_head()
    if not hasattr(decoder, "layers"):
        return f"{type(decoder).__name__} has no .layers"
    if getattr(model, "attn_implementation", None) == "flash_attention_2":
        from transformers.utils import is_flash_attn_greater_or_equal_2_10

        if not is_flash_attn_greater_or_equal_2_10():
            return "flash-attn < 2.1 aligns the causal mask top-left (a suffix on cached keys needs bottom-right)"
    return None


def layout(input_ids, spans, labels, image_token_id):
    """(root_end, trunk_end) of a batch: the shared tokens of all passes / of plain and EP, or why none.

    Every sample's prefix must be valid tokens without labels (right padding; the response comes
    after the image), checked here with one host sync.
    """
    is_image = input_ids == image_token_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    first_image = torch.where(is_image, positions, input_ids.shape[1]).amin()
    trunk_end = min(a for a, _ in spans)
    labelled = (labels[:, :trunk_end + 1] != losses.IGNORE_INDEX).any()
    root_end, labelled = torch.stack([first_image, labelled.long()]).tolist()
    if trunk_end == 0:
        return "a sample has its image at the start: nothing to share"
    if labelled:
        return "labelled tokens before the image end: the prefix is not a prompt"
    return root_end, trunk_end


def split_ep_backward(model, decoder):
    """Whether the EP pass's gradient can be taken on its own (see the module docstring)."""
    if not torch.is_grad_enabled() or (model.use_rda and not model.detach_rda):
        return False  # RDA*: the EP logits get RDA's gradient too, so EP is coupled to the plain pass
    if getattr(model, "image_features_trainable", False):
        # a trained projector (LLaVA's finetune, InternVL2 with mlp1 trained): every embedding of the batch comes
        # out of the one op that placed the image features, so the EP pass's own backward would free the graph
        # the plain pass still needs
        return False
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:
        # checkpointed, the EP pass keeps only its layer inputs, less than the trunk keys/values' gradient
        return False
    fp16 = decoder.dtype == torch.float16 or (torch.is_autocast_enabled("cuda")
                                              and torch.get_autocast_dtype("cuda") == torch.float16)
    if fp16:  # an unscaled fp16 backward would underflow; the loss scaler only scales the final one
        log_once("VITask: fp16 -- the EP pass is backpropagated with the others (higher peak memory)")
        return False
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 partitions the parameters
        log_once("VITask: DeepSpeed ZeRO-3 -- the EP pass is backpropagated with the others")
        return False
    return True


# ---- gradient carrier ----------------------------------------------------------------------------
class _GradientCarrier(torch.autograd.Function):
    """Value 0; in backward, hands each input tensor its precomputed gradient times the incoming scale
    (the loss scaler's and gradient accumulation's factors reach it as they reach every loss term)."""

    @staticmethod
    def forward(ctx, grads, *tensors):
        ctx.grads = grads
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx, scale):
        return (None, *((g * scale).to(g.dtype) for g in ctx.grads))


def carry_gradients(tensors, grads):
    """A 0-valued scalar whose gradient w.r.t. ``tensors[i]`` is ``grads[i]`` (None grads are dropped)."""
    pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None]
    if not pairs:
        return None
    return _GradientCarrier.apply(tuple(g for _, g in pairs), *(t for t, _ in pairs))


# ---- the step ------------------------------------------------------------------------------------
def shared_prefix_terms(model, plain, ep, neg, root_end, trunk_end):
    """Eq. 7's terms from passes that share their prefixes; same as full passes, less work.

    The plain pass runs in full and keeps its keys/values; the EP suffix runs on their first
    ``trunk_end`` positions, the CRT negative's suffix on their first ``root_end``. ``plain``, ``ep``,
    ``neg`` (None without CRT): (embeds, attention_mask, position_ids, labels) of right-padded
    sequences, as ``response_logits`` takes them; ``root_end``/``trunk_end`` from ``layout``.
    """
    decoder, head = model.decoder_and_head()
    run = DecoderRunner(decoder)
    split = split_ep_backward(model, decoder)

    def response_logits(seq, start, past):
        embeds, mask, positions, labels = seq
        hidden, kv = run(embeds[:, start:], mask, positions[:, start:], past)
        rows, targets = losses.response_rows(hidden, labels[:, start:])
        return head(rows), targets, kv

    def prefix(kv, end):  # the first ``end`` positions of per-layer (key, value): views, graph kept
        return [(k[..., :end, :], v[..., :end, :]) for k, v in kv] if end > 0 else None

    with layerwise_checkpointing(decoder):
        plain_logits, targets, kv = response_logits(plain, 0, None)
        trunk = prefix(kv, trunk_end)

        ep_past = trunk
        if split:  # the EP pass sees the trunk as leaves: its backward stops there
            ep_past = [tuple(t.detach().requires_grad_(t.requires_grad) for t in layer) for layer in trunk]
        ep_logits, _, _ = response_logits(ep, trunk_end, ep_past)
        loss_ep = losses.exemplar_prompting_loss(ep_logits, targets)
        if split and loss_ep.requires_grad:
            params = [p for p in model.parameters() if p.requires_grad]
            kv_pairs = [(t, leaf) for layer, leaves in zip(trunk, ep_past) for t, leaf in zip(layer, leaves)
                        if leaf.requires_grad]
            grads = torch.autograd.grad(loss_ep, params + [leaf for _, leaf in kv_pairs], allow_unused=True)
            carrier = carry_gradients(params + [t for t, _ in kv_pairs], grads)
            del ep_past, kv_pairs, grads  # with the EP graph freed by autograd.grad: its activations go now
            loss_ep = loss_ep.detach() if carrier is None else loss_ep.detach() + carrier
            ep_logits = ep_logits.detach()

        terms = {"loss_van": losses.vanilla_loss(plain_logits, targets), "loss_ep": loss_ep}
        if model.use_rda:
            terms["loss_rda"] = losses.response_distribution_alignment_loss(plain_logits, ep_logits, model.detach_rda,
                                                                            model.rda_kl)
        if neg is not None:
            neg_logits, _, _ = response_logits(neg, root_end, prefix(kv, root_end))
            terms["loss_crt"] = losses.contrastive_response_tuning_loss(plain_logits, neg_logits, targets)
    return terms
