"""Key/value caches of every InternVL2 LLM, whatever their kind.

InternVL2's InternLM2 remote code (InternVL2-2B/8B/26B) takes and returns legacy tuples -- one ``(key,
value)`` pair of ``(batch, kv_heads, length, head_dim)`` tensors per layer -- while transformers' Qwen2,
Phi3 and Llama classes (InternVL2-1B/4B/40B) return a ``transformers.cache_utils.Cache`` (a
``DynamicCache``). Code that reuses a prompt's cache (shared-prefix ranking, generation, the eval hook,
chat) goes through these helpers; each returns the kind it was given, which is the kind the model that
produced it accepts back.
"""
import copy

import torch

from ..errors import VITaskError


def _is_cache_object(past_key_values):
    from transformers.cache_utils import Cache

    return isinstance(past_key_values, Cache)


def _check_legacy(past_key_values):
    if not (isinstance(past_key_values, (tuple, list)) and past_key_values
            and all(isinstance(layer, (tuple, list)) and len(layer) >= 2 for layer in past_key_values)):
        raise VITaskError(f"the LLM's KV cache is a {type(past_key_values).__name__}, neither a transformers Cache "
                          "nor a tuple of (key, value) per layer: rank with strategy='full-sequence' (no cache reuse)")


def _map_legacy(past_key_values, fn):
    return tuple(tuple(fn(t) for t in layer) for layer in past_key_values)


def cache_length(past_key_values):
    """Number of positions the cache holds (0 for None)."""
    if past_key_values is None:
        return 0
    if _is_cache_object(past_key_values):
        return int(past_key_values.get_seq_length())
    _check_legacy(past_key_values)
    return int(past_key_values[0][0].shape[-2])


def _rebuild(past_key_values, fn):
    """A new cache of the same kind whose tensors are ``fn(tensor)`` (the batch is dim 0 everywhere)."""
    if _is_cache_object(past_key_values):
        from transformers.cache_utils import DynamicCache

        if type(past_key_values) is DynamicCache:
            return DynamicCache.from_legacy_cache(_map_legacy(past_key_values.to_legacy_cache(), fn))
        raise VITaskError(f"{type(past_key_values).__name__} cannot be re-batched here: use a DynamicCache "
                          "(the default of transformers' generate and forward) or legacy tuples, or rank with "
                          "strategy='full-sequence'")
    _check_legacy(past_key_values)
    return _map_legacy(past_key_values, fn)


def repeat_kv_cache(past_key_values, repeats):
    """Each batch row repeated ``repeats`` times in a row (``repeat_interleave``): a prompt's cache for
    ``repeats`` continuations of it. Returns a new cache of the kind given; the input is not modified."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if _is_cache_object(past_key_values) and hasattr(past_key_values, "batch_repeat_interleave") \
            and type(past_key_values).__name__ != "DynamicCache":  # other Cache kinds repeat themselves
        repeated = copy.deepcopy(past_key_values)
        repeated.batch_repeat_interleave(repeats)
        return repeated
    return _rebuild(past_key_values, lambda t: t.repeat_interleave(repeats, dim=0))


def select_kv_cache(past_key_values, index):
    """The batch rows ``index`` (a 1-D index tensor or list) of the cache, as a new cache of the kind given."""
    index = torch.as_tensor(index, dtype=torch.long)
    return _rebuild(past_key_values, lambda t: t.index_select(0, index.to(t.device)))


def copy_kv_cache(past_key_values):
    """An independent copy (a model call may extend a Cache object in place)."""
    if _is_cache_object(past_key_values):
        return copy.deepcopy(past_key_values)
    _check_legacy(past_key_values)
    return _map_legacy(past_key_values, lambda t: t)  # tensors are never changed in place by the models
