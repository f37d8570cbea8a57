"""XTuner's InternVL_V1_5 wrapper, fixed for CPU, GPUs without flash-attention and every InternVL2 LLM.

Only what blocks those differs from XTuner:
- XTuner forces ``flash_attention_2`` (an ImportError without flash-attn); here the attention
  implementation is a config value resolved per LLM (:mod:`.attention`: ``'auto'`` = flash-attention
  where it imports and CUDA runs, else SDPA where the LLM's code supports it, else eager -- InternVL2's
  InternLM2 has no SDPA), and so is the load dtype.
- LoRA targets and the trained head come from the LLM's architecture (``target_modules="auto"``,
  ``modules_to_save="auto"``, :mod:`.lora`), and an entry that matches nothing is an error, not silence.
- XTuner's ``_llm_forward`` calls ``torch.distributed.get_rank()`` and so needs a
  process group even in a single process; the forward here is composed of small
  steps (encode images, splice embeddings, run the LLM) that VITask reuses.
- ``mlp1`` can be frozen (InternVL2 recipes and the paper keep it frozen; XTuner trains it).
"""
import contextlib

import torch
import xtuner.model.internvl as xtuner_internvl
from mmengine.config import ConfigDict
from xtuner.model import InternVL_V1_5

from ..errors import VITaskError
from ..internvl_config import load_internvl_config  # noqa: F401 (re-exported)
from . import losses
from .attention import (apply_attn_implementation, load_kwargs,  # noqa: F401 (re-exported)
                        resolve_attn_implementation)
from .plugin_wrapper import ConfigMismatchError, PluginWrapperMixin  # noqa: F401 (re-exported)
from .zero3_cpu import make_cpu_all_gathers_complete


def resolve_dtype(name):
    """'auto' -> bfloat16 on CUDA, float32 on CPU (bf16 updates of small CPU models round away)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(name, torch.dtype):
        return name
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise VITaskError(f"torch_dtype={name!r}: use 'auto', 'bfloat16', 'float16' or 'float32'") from None


@contextlib.contextmanager
def _load_overrides(model_path, attn_implementation, torch_dtype):
    """While XTuner's __init__ runs, let its AutoModel.from_pretrained use our attention and dtype.

    XTuner has just written "flash_attention_2" into the LLM config (``attn_implementation`` for InternLM2,
    ``_attn_implementation`` otherwise); both are set again here, and InternVL2's ``use_flash_attn`` keyword
    is passed so its model code does not switch flash on by itself where flash-attn imports.
    """
    real_auto_model = xtuner_internvl.AutoModel

    class _AutoModel:
        @staticmethod
        def from_pretrained(path, *args, config=None, **kwargs):
            apply_attn_implementation(config, attn_implementation)
            kwargs.update(load_kwargs(config, model_path, attn_implementation))
            kwargs["torch_dtype"] = torch_dtype
            make_cpu_all_gathers_complete()  # ZeRO-3 on CPU: no parameter used half-gathered (zero3_cpu.py)
            return real_auto_model.from_pretrained(path, *args, config=config, **kwargs)

    xtuner_internvl.AutoModel = _AutoModel
    try:
        yield
    finally:
        xtuner_internvl.AutoModel = real_auto_model


class InternVL2(PluginWrapperMixin, InternVL_V1_5):
    """XTuner's InternVL2 wrapper with the attention, dtype and mlp1 freezing as config values.

    Args (beyond XTuner's): attn_implementation ('auto'|'eager'|'sdpa'|'flash_attention_2', checked against
    the LLM), torch_dtype ('auto'|'bfloat16'|'float16'|'float32'), freeze_mlp1, activation_checkpointing;
    ``llm_lora`` may say ``target_modules="auto"`` and ``modules_to_save="auto"`` (see :mod:`.lora`);
    ``llm=None`` only lets ``xtuner convert pth_to_hf`` read ``cfg.model.llm``.
    """

    def __init__(self, model_path, *, attn_implementation="auto", torch_dtype="auto", freeze_mlp1=False,
                 activation_checkpointing=True, llm_lora=None, llm=None, **kwargs):
        # ``llm`` is ignored: XTuner's pth_to_hf reads ``cfg.model.llm`` (configs set it to None)
        config = load_internvl_config(model_path)
        self.attn_implementation = resolve_attn_implementation(attn_implementation, config, model_path)
        if isinstance(llm_lora, dict) and not isinstance(llm_lora, ConfigDict):
            llm_lora = ConfigDict(llm_lora)
        # New weights (LoRA, VITask's connector) start from the run's seed, whatever the runner drew before:
        # mmengine's DeepSpeed runner builds the model after the dataloaders, its plain runner right after seeding.
        torch.manual_seed(torch.initial_seed())
        with _load_overrides(model_path, self.attn_implementation, resolve_dtype(torch_dtype)):
            super().__init__(model_path, llm_lora=llm_lora, **kwargs)
        self.model_path = model_path
        self.freeze_mlp1 = freeze_mlp1
        if freeze_mlp1:
            self.model.mlp1.requires_grad_(False)
        if not activation_checkpointing:
            self.gradient_checkpointing_disable()

    def lora_llm(self):
        return self.model.language_model

    def state_dict(self, *args, **kwargs):
        """XTuner's choice (LoRA / unfrozen towers / mlp1), minus mlp1 when it is frozen (it is the base model's)."""
        state = super().state_dict(*args, **kwargs)
        if getattr(self, "freeze_mlp1", False):
            state = type(state)((k, v) for k, v in state.items() if "model.mlp1." not in k)
        return state

    # ---- the steps of one forward pass -------------------------------------------------
    @property
    def vision_frozen(self):
        return self.freeze_visual_encoder and self.freeze_mlp1 and not self.use_visual_encoder_lora

    def encode_images(self, pixel_values):
        """(n_tiles, 3, H, W) -> (n_tiles, num_image_token, hidden): ViT + pixel shuffle + mlp1."""
        pixel_values = pixel_values.to(self.model.vision_model.dtype)
        with torch.no_grad() if self.vision_frozen else contextlib.nullcontext():
            return self.model.extract_feature(pixel_values)

    def embed_tokens(self, input_ids, vit_embeds):
        """Token embeddings with the <IMG_CONTEXT> positions holding ``vit_embeds`` (out of place)."""
        embeds = self.model.language_model.get_input_embeddings()(input_ids)
        selected = input_ids == self.model.img_context_token_id
        n_slots, n_feats = int(selected.sum()), vit_embeds.shape[0] * vit_embeds.shape[1]
        if n_slots != n_feats:
            raise VITaskError(
                f"the batch has {n_slots} <IMG_CONTEXT> tokens but its images give {n_feats} features: "
                "the dataset's image size/tiling does not match the model config (use this project's dataset)"
            )
        flat = embeds.reshape(-1, embeds.shape[-1])
        index = selected.reshape(-1).nonzero().squeeze(-1)
        flat = flat.index_copy(0, index, vit_embeds.reshape(-1, flat.shape[-1]).to(flat.dtype))
        return flat.reshape(embeds.shape)

    def response_logits(self, inputs_embeds, attention_mask, position_ids, labels):
        """LLM logits (T, V) at the positions that predict the T response tokens, and their (T,) targets.

        The LM head runs on response rows only: the full (B, L, V) logits of a
        92k-token vocabulary would dominate memory and time for short answers.
        """
        decoder, head = self.decoder_and_head()
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, return_dict=True).last_hidden_state
        rows, targets = losses.response_rows(hidden, labels)
        return head(rows), targets

    def decoder_and_head(self):
        """The LLM's decoder body and its LM head, through peft's wrapper (InternLM2's remote code has no
        ``get_decoder``; its body is ``.model``)."""
        lm = self.model.language_model
        causal_lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
        return decoder, causal_lm.get_output_embeddings()

    # ---- export (xtuner convert pth_to_hf) ----------------------------------------------------
    @property
    def llm(self):
        """The LLM, under the name XTuner's tools use (pth_to_hf sets ``model.llm.config.use_cache``)."""
        return self.model.language_model

    def to_hf(self, cfg=None, save_dir=None, fp32=False, save_pretrained_kwargs=None, save_format="xtuner", **kwargs):
        """Merged Hugging Face folder (see xtuner_vitask.export); called by ``xtuner convert pth_to_hf``."""
        from ..export import export_to_hf

        return export_to_hf(self, cfg=cfg, save_dir=save_dir, fp32=fp32, save_pretrained_kwargs=save_pretrained_kwargs,
                            save_format=save_format, **kwargs)

    @staticmethod
    def stack_tiles(pixel_values):
        """XTuner's collate gives a (B, n, 3, H, W) tensor or a list of (n_i, 3, H, W): -> (sum n_i, 3, H, W)."""
        if isinstance(pixel_values, (list, tuple)):
            return torch.cat([p.unsqueeze(0) if p.ndim == 3 else p for p in pixel_values], dim=0)
        return pixel_values.flatten(0, 1) if pixel_values.ndim == 5 else pixel_values

    def forward(self, data, data_samples=None, mode="loss"):
        if mode != "loss":
            raise NotImplementedError(f"{type(self).__name__} supports mode='loss' only (use the eval tools)")
        pixel_values = self.stack_tiles(data["pixel_values"])
        # XTuner's convention: an all-zero tile stands for "no image" (text-only sample).
        has_image = pixel_values.flatten(1).abs().sum(-1) != 0
        vit_embeds = self.encode_images(pixel_values[has_image])
        embeds = self.embed_tokens(data["input_ids"], vit_embeds)
        rows, targets = self.response_logits(embeds, data["attention_mask"], data["position_ids"], data["labels"])
        return {"loss": losses.vanilla_loss(rows, targets)}
