"""XTuner's LLaVAModel as a VITask adapter, and ``VITaskLLaVA``: the same method as on InternVL2.

``LLaVA`` keeps XTuner's model (LLM + CLIP tower + its ``ProjectorModel``, ``pretrained_pth`` from the
pretrain stage, LoRA, ``to_hf`` writing XTuner's LLaVA layout for ``xtuner chat --llava``) and changes
only what blocks CPU runs and the shared method:

- XTuner's ``_prepare_for_flash_attn`` asks the device for bf16 support before anything else, which
  ``torch.cpu`` cannot answer (AttributeError); here the attention is a config value resolved per LLM
  (:mod:`.attention`: 'auto' = flash-attention 2 where usable, else SDPA if the LLM's code has it, else
  eager), and so is the load dtype.
- LoRA ``target_modules="auto"`` / ``modules_to_save="auto"`` from the LLM's architecture (:mod:`.lora`).
- The adapter interface of :class:`~.vitask.VITask`: the dataset (``datasets.llava``) writes one
  ``IMAGE_TOKEN_INDEX`` per image feature -- the sequence XTuner's ``prepare_inputs_labels_for_multimodal``
  builds from its single placeholder -- so image features, exemplar spans and splices are positions in
  ``input_ids`` exactly as for InternVL2's ``<IMG_CONTEXT>`` tokens.
- ``freeze_projector``: XTuner's finetune stage trains the projector (it is always in XTuner's
  checkpoints); VITask's LLaVA configs keep that default.
"""
import contextlib
import copy
import types

import torch
from mmengine.config import ConfigDict
from transformers import AutoConfig
from xtuner.model import LLaVAModel
from xtuner.utils import IMAGE_TOKEN_INDEX

from ..errors import VITaskError
from . import losses
from .attention import FLASH, resolve_attn_implementation
from .internvl import InternVL2, resolve_dtype
from .plugin_wrapper import PluginWrapperMixin
from .vitask import VITask, check_vitask_arguments


def _as_config(cfg):
    if isinstance(cfg, dict) and not isinstance(cfg, ConfigDict):
        return ConfigDict(cfg)
    return cfg


class LLaVA(PluginWrapperMixin, LLaVAModel):
    """XTuner's LLaVAModel with the attention, dtype and LoRA targets as config values, on any device.

    Args (beyond XTuner's ``llm``, ``visual_encoder``, ``pretrained_pth``, ``llm_lora``, ...):
        attn_implementation: 'auto'|'eager'|'sdpa'|'flash_attention_2', checked against the LLM's code.
        torch_dtype: 'auto' (bf16 on CUDA, fp32 on CPU)|'bfloat16'|'float16'|'float32'; the LLM and the
            vision tower load in it (a ``torch_dtype`` in the ``llm`` dict wins for the LLM).
        activation_checkpointing: XTuner's ``use_activation_checkpointing``.
        freeze_projector: False (XTuner's finetune trains the projector).
    """

    def __init__(self, llm, visual_encoder, *, attn_implementation="auto", torch_dtype="auto",
                 activation_checkpointing=True, freeze_projector=False, llm_lora=None, **kwargs):
        if "use_activation_checkpointing" in kwargs:
            activation_checkpointing = kwargs.pop("use_activation_checkpointing")
        self._requested_attn = attn_implementation  # read by _prepare_for_flash_attn during XTuner's __init__
        self._dtype = resolve_dtype(torch_dtype)
        llm, visual_encoder = _as_config(copy.deepcopy(llm)), _as_config(copy.deepcopy(visual_encoder))
        if isinstance(visual_encoder, dict):
            visual_encoder.setdefault("torch_dtype", self._dtype)
        # LoRA and the projector start from the run's seed, whatever the runner drew before (as InternVL2)
        torch.manual_seed(torch.initial_seed())
        super().__init__(llm, visual_encoder, llm_lora=_as_config(llm_lora),
                         use_activation_checkpointing=activation_checkpointing, **kwargs)
        self.freeze_projector = freeze_projector
        if freeze_projector:
            self.projector.requires_grad_(False)

    # ---- what XTuner does on GPUs only -------------------------------------------------------
    def _prepare_for_flash_attn(self, cfg, llm_cfg):
        """Attention per LLM (:mod:`.attention`) and the dtype, instead of XTuner's device probe."""
        view = types.SimpleNamespace(llm_config=llm_cfg, auto_map=None)  # attention.py reads InternVL's layout
        implementation = resolve_attn_implementation(self._requested_attn, view, cfg.pretrained_model_name_or_path)
        self.attn_implementation = implementation
        if hasattr(llm_cfg, "attn_implementation"):  # InternLM2's own switch (eager or flash)
            llm_cfg.attn_implementation = implementation
        llm_cfg._attn_implementation = implementation
        cfg.config = llm_cfg
        cfg.attn_implementation = implementation
        cfg.setdefault("torch_dtype", self._dtype)
        if implementation == FLASH and cfg.torch_dtype == torch.float32:
            raise VITaskError("attn_implementation='flash_attention_2' runs in bfloat16/float16 only: set "
                              "torch_dtype='bfloat16'")
        return cfg, llm_cfg

    def _dispatch_lm_model_cfg(self, cfg, max_position_embeddings=None):
        try:
            AutoConfig.from_pretrained(cfg.pretrained_model_name_or_path, trust_remote_code=True)
        except (OSError, ValueError) as err:
            raise VITaskError(f"cannot read the LLM's config from {cfg.pretrained_model_name_or_path}: "
                              f"{str(err).splitlines()[0]}; pass a local LLM folder (huggingface-cli download "
                              "internlm/internlm2-chat-1_8b --local-dir ...)") from None
        return super()._dispatch_lm_model_cfg(cfg, max_position_embeddings)

    def lora_llm(self):
        return self.llm

    # ---- the adapter (see models.vitask.VITask) ------------------------------------------------
    image_token_id = IMAGE_TOKEN_INDEX
    stack_tiles = staticmethod(InternVL2.stack_tiles)

    @property
    def llm_hidden_size(self):
        return self.llm.get_input_embeddings().embedding_dim

    @property
    def vision_frozen(self):
        return self.freeze_visual_encoder and not self.use_visual_encoder_lora

    @property
    def image_features_trainable(self):
        return not self.vision_frozen or any(p.requires_grad for p in self.projector.parameters())

    def encode_images(self, pixel_values):
        """(n, 3, H, W) -> (n, patches, llm hidden): CLIP's ``visual_select_layer`` without CLS, projector."""
        pixel_values = pixel_values.to(self.visual_encoder.dtype)
        with torch.no_grad() if self.vision_frozen else contextlib.nullcontext():
            hidden = self.visual_encoder(pixel_values, output_hidden_states=True).hidden_states
            features = hidden[self.visual_select_layer][:, 1:]
        return self.projector(features)

    def embed_tokens(self, input_ids, image_features):
        """Token embeddings with the IMAGE_TOKEN_INDEX positions holding ``image_features`` (out of place)."""
        selected = input_ids == self.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(selected, 0))
        n_slots, n_feats = int(selected.sum()), image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise VITaskError(f"the batch has {n_slots} image positions but its images give {n_feats} features: "
                              "the dataset's image size does not match the vision tower (use VITaskLLaVADataset "
                              "with this model's visual encoder)")
        flat = embeds.reshape(-1, embeds.shape[-1])
        index = selected.reshape(-1).nonzero().squeeze(-1)
        flat = flat.index_copy(0, index, image_features.reshape(-1, flat.shape[-1]).to(flat.dtype))
        return flat.reshape(embeds.shape)

    def decoder_and_head(self):
        """The LLM's decoder body and its LM head, through peft's wrapper."""
        causal_lm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
        return decoder, causal_lm.get_output_embeddings()

    def response_logits(self, inputs_embeds, attention_mask, position_ids, labels):
        """LLM logits (T, V) at the positions predicting the T response tokens, and their (T,) targets
        (the LM head on response rows only, as InternVL2's adapter)."""
        decoder, head = self.decoder_and_head()
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, return_dict=True).last_hidden_state
        rows, targets = losses.response_rows(hidden, labels)
        return head(rows), targets

    def forward(self, data, data_samples=None, mode="loss"):
        """Instruction tuning (eq. 1) on the expanded-image-token batches of ``VITaskLLaVADataset``."""
        if mode != "loss":
            raise NotImplementedError(f"{type(self).__name__} supports mode='loss' only")
        features = self.encode_images(self.stack_tiles(data["pixel_values"]))
        embeds = self.embed_tokens(data["input_ids"], features)
        rows, targets = self.response_logits(embeds, data["attention_mask"], data["position_ids"], data["labels"])
        return {"loss": losses.vanilla_loss(rows, targets)}


class VITaskLLaVA(VITask, LLaVA):
    """XTuner's LLaVA + VITask (EP, RDA, CRT), trained in two stages; the method is ``VITask``'s, shared
    with ``VITaskInternVL``.

    Args: as ``LLaVA`` (vision tower frozen by default, projector trained as in XTuner's finetune) and as
    ``VITaskInternVL`` for the method (tsm, exemplar_dim, ep_mode, alpha, beta, use_rda, use_crt, detach_rda,
    rda_kl, shared_prefix).
    ``xtuner convert pth_to_hf`` writes the plain model in XTuner's LLaVA layout (``llm_adapter/``,
    ``projector/``; ``visual_encoder/`` when it was trained) through XTuner's own ``to_hf``.
    """

    def __init__(self, llm, visual_encoder, *, tsm=None, exemplar_dim=None, ep_mode="cls", alpha=1.0, beta=1.0,
                 use_rda=True, use_crt=True, detach_rda=True, rda_kl="reverse", shared_prefix=True,
                 freeze_visual_encoder=True, **kwargs):
        check_vitask_arguments(ep_mode, alpha, beta, rda_kl)
        super().__init__(llm, visual_encoder, freeze_visual_encoder=freeze_visual_encoder, **kwargs)
        self._init_vitask(tsm, exemplar_dim, ep_mode, alpha, beta, use_rda, use_crt, detach_rda, shared_prefix,
                          rda_kl)

    def to_hf(self, cfg, save_dir, fp32=False, save_pretrained_kwargs=None, save_format="xtuner", **kwargs):
        """XTuner's export (``xtuner convert pth_to_hf``: its LLaVA layout for ``xtuner chat --llava``), plus the
        EP parts beside it in the xtuner format (``export/llava.py``: connector/ and tsm/)."""
        super().to_hf(cfg, save_dir, fp32=fp32, save_pretrained_kwargs=save_pretrained_kwargs or {},
                      save_format=save_format, **kwargs)
        if save_format == "xtuner":
            from ..export.llava import write_ep_parts

            write_ep_parts(self, save_dir)
