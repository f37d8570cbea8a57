"""Attention implementation of an InternVL2 checkpoint's LLM: one resolver for every loader.

What decides it, per LLM (facts of InternVL2's remote code, XTuner 0.2.0 and transformers 4.48):
- InternVL2's ``InternVLChatModel.__init__(config, ..., use_flash_attn=True)`` turns ``use_flash_attn``
  off when flash-attn does not import, then writes ``config.vision_config.use_flash_attn`` and
  ``config.llm_config.attn_implementation`` ("flash_attention_2" or "eager"): InternLM2's own code reads
  that public field. XTuner sets the same field for InternLM2 and ``llm_config._attn_implementation`` for
  the others.
- transformers checks ``llm_config._attn_implementation`` when the LLM is built: "sdpa" needs the class to
  declare ``_supports_sdpa`` (InternLM2's code does not: ValueError), "flash_attention_2" needs
  ``_supports_flash_attn_2``, flash-attn and a GPU (ImportError otherwise).

So: "auto" = flash-attention 2 where it imports, CUDA runs and the LLM supports it; else SDPA where the LLM
class declares ``_supports_sdpa``; else eager. An explicit choice the LLM cannot do is one VITaskError that
names the LLM class and the choices that work.
"""
import importlib.util
import inspect
import sys

import torch

from ..errors import VITaskError

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
FLASH = "flash_attention_2"
# LLMs of InternVL2 checkpoints whose class lives in the checkpoint's remote code, for when it cannot be read
_REMOTE_LLM_SUPPORT = {"InternLM2ForCausalLM": ("eager", FLASH)}


def flash_attention_usable():
    """flash-attn only runs (and only helps) when it imports and a CUDA GPU is there."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _dynamic_class(reference, model_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(reference, model_path)


def model_class(config, model_path):
    """The class ``AutoModel`` builds for the checkpoint (its remote code), or None."""
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if not reference or model_path is None:
        return None
    try:
        return _dynamic_class(reference, model_path)
    except (OSError, ImportError, AttributeError, ValueError):
        return None


def llm_class(config, model_path=None):
    """The LLM class of an InternVLChatConfig: transformers' own, else the checkpoint's remote code."""
    import transformers

    name = config.llm_config.architectures[0]
    found = getattr(transformers, name, None)
    if found is not None:
        return found
    top = model_class(config, model_path)  # InternVL2's modeling file imports its LLM class
    if top is not None and getattr(sys.modules.get(top.__module__), name, None) is not None:
        return getattr(sys.modules[top.__module__], name)
    reference = (getattr(config.llm_config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if reference and model_path is not None:
        try:
            return _dynamic_class(reference, model_path)
        except (OSError, ImportError, AttributeError, ValueError):
            return None
    return None


def supported_attn_implementations(config, model_path=None):
    """(LLM class name, implementations its code supports, in preference order low -> high)."""
    name = config.llm_config.architectures[0]
    cls = llm_class(config, model_path)
    if cls is None:
        return name, _REMOTE_LLM_SUPPORT.get(name, ("eager",))
    supported = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        supported.append("sdpa")
    if getattr(cls, "_supports_flash_attn_2", False):
        supported.append(FLASH)
    return cls.__name__, tuple(supported)


def resolve_attn_implementation(requested, config=None, model_path=None):
    """The implementation to load with: 'auto' resolved, an explicit choice checked against the LLM.

    Without ``config`` only the name is checked and 'auto' assumes an LLM with SDPA support.
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise VITaskError(f"attn_implementation={requested!r}: use one of "
                          f"{', '.join(repr(a) for a in ATTN_IMPLEMENTATIONS)}")
    if config is None:
        name, supported = "the LLM", ("eager", "sdpa", FLASH)
    else:
        name, supported = supported_attn_implementations(config, model_path)
    usable = [impl for impl in supported if impl != FLASH or flash_attention_usable()]
    if requested == "auto":
        return usable[-1]
    if requested in usable:
        return requested
    working = ", ".join(repr(c) for c in ["auto"] + usable[::-1])
    if requested == FLASH and FLASH in supported:
        raise VITaskError(f"attn_implementation='flash_attention_2' needs flash-attn installed and a CUDA GPU "
                          f"(this machine: flash-attn {'found' if importlib.util.find_spec('flash_attn') else 'missing'}"
                          f", CUDA {'available' if torch.cuda.is_available() else 'unavailable'}); "
                          f"choices that work for {name} here: {working}")
    raise VITaskError(f"attn_implementation={requested!r}: {name} (the checkpoint's LLM) does not support it; "
                      f"choices that work here: {working}")


def apply_attn_implementation(config, implementation):
    """Point every attention switch of an InternVLChatConfig at ``implementation`` (in place)."""
    flash = implementation == FLASH
    if hasattr(config.vision_config, "use_flash_attn"):
        config.vision_config.use_flash_attn = flash
    if hasattr(config, "use_flash_attn"):  # older project-made checkpoints kept it here
        config.use_flash_attn = flash
    if hasattr(config.llm_config, "attn_implementation"):  # InternLM2's own switch (eager or flash only)
        config.llm_config.attn_implementation = implementation
    config.llm_config._attn_implementation = implementation


def _takes_use_flash_attn(cls):
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if "use_flash_attn" in params:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return False
    return False


def load_kwargs(config, model_path, implementation):
    """``from_pretrained`` keywords that make the checkpoint's model class honour ``implementation``:
    InternVL2's ``use_flash_attn`` (it would otherwise turn flash on wherever flash-attn imports)."""
    cls = model_class(config, model_path)
    return {"use_flash_attn": implementation == FLASH} if cls is not None and _takes_use_flash_attn(cls) else {}


def prepare_attention(model_path, requested="auto", config=None):
    """For loaders: (config with the switches set, resolved implementation, from_pretrained keywords)."""
    if config is None:
        from ..internvl_config import load_internvl_config

        config = load_internvl_config(model_path)
    implementation = resolve_attn_implementation(requested, config, model_path)
    apply_attn_implementation(config, implementation)
    return config, implementation, load_kwargs(config, model_path, implementation)


def add_cli_argument(parser):
    """The ``--attn-implementation`` flag every loading subcommand takes."""
    parser.add_argument("--attn-implementation", default="auto", choices=ATTN_IMPLEMENTATIONS,
                        help="attention of the LLM: auto (flash-attention 2 where it imports and a GPU runs, else "
                             "SDPA where the LLM's code supports it, else eager; InternLM2 has no SDPA)")
