"""VITask -- exemplar prompting, response distribution alignment and contrastive response tuning
(paper sec. 4, eqs. 1-7) -- written once for every VLM family, and ``VITaskInternVL``, the method on
the InternVL2 wrapper (``VITaskLLaVA`` in ``llava.py`` is the same method on XTuner's LLaVA).

This is the only place that knows the stage. Stage 1 trains the LLM (LoRA) and
the exemplar connector on L_van + L_EP + alpha L_RDA; stage 2 (switched by
``VITaskStageHook``) freezes the connector and adds beta L_CRT.
"""
from collections import OrderedDict

import torch

from ..engine.param_groups import tag_param_group
from ..ep.exemplar_prompting import ExemplarConnector, exemplar_spans, feature_kind, splice_exemplars
from ..errors import VITaskError
from . import losses
from .internvl import InternVL2
from .shared_prefix import layout, log_once, shared_prefix_terms, unsupported_reason

# The connector's optimizer group (engine.param_groups), which stage 2 pins to lr = weight_decay = 0.
CONNECTOR_GROUP = "connector"


def check_vitask_arguments(ep_mode, alpha, beta, rda_kl="reverse"):
    """Refuse an unknown EP mode, RDA direction or a negative loss weight before any model is loaded."""
    feature_kind(ep_mode)  # refuses anything but EP_MODES
    if rda_kl not in losses.RDA_KL:
        raise VITaskError(f"rda_kl={rda_kl!r}: choose one of {', '.join(losses.RDA_KL)} (reverse = eq. 3 as printed)")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value < 0:
            raise VITaskError(f"{name}={value}: loss weights must be >= 0 (0 switches the term off)")


class VITask:
    """The VITask method on any VLM wrapper (a mixin: ``class VITaskX(VITask, XWrapper)``).

    The wrapper is the adapter of its VLM family; it provides
        ``image_token_id``: the id marking image-feature positions in ``input_ids`` (one per feature);
        ``llm_hidden_size``: the width of the LLM's token embeddings;
        ``stack_tiles(pixel_values)`` -> (n, 3, H, W) images of the batch;
        ``encode_images(pixels)`` -> (n, features per image, llm_hidden_size), in the LLM's space;
        ``embed_tokens(input_ids, features)`` -> (B, L, llm_hidden_size) with the image positions filled;
        ``response_logits(embeds, mask, positions, labels)`` -> (T, V) rows predicting the response, (T,) targets;
        ``decoder_and_head()`` -> the LLM's decoder body and LM head (for the shared-prefix passes);
        ``image_features_trainable``: whether ``encode_images`` has trainable parameters (projector, tower).
    Everything else -- the exemplar connector, where its tokens go, the splice, eqs. 1-7, the shared-prefix
    passes, the stages, the checkpoint contents -- is here, once.
    """

    def _init_vitask(self, tsm, exemplar_dim, ep_mode, alpha, beta, use_rda, use_crt, detach_rda, shared_prefix,
                     rda_kl="reverse"):
        """After the wrapper is built: the TSM (frozen, optional), the connector, stage 1."""
        self.ep_mode, self.alpha, self.beta = ep_mode, float(alpha), float(beta)
        self.use_rda, self.use_crt, self.detach_rda = use_rda and alpha > 0, use_crt and beta > 0, detach_rda
        self.rda_kl = rda_kl
        self.shared_prefix = shared_prefix

        self.tsm = None
        if tsm is not None:
            from ..tsm.checkpoint import check_tsm_matches_meta, load_tsm, resolve_checkpoint

            tsm = dict(tsm)
            meta = tsm.pop("meta", None)
            tsm["checkpoint"] = resolve_checkpoint(tsm["checkpoint"])
            self.tsm = load_tsm(**tsm)
            if meta is not None:
                check_tsm_matches_meta(self.tsm, meta)
            if exemplar_dim is not None and exemplar_dim != self.tsm.feature_dim:
                raise VITaskError(f"exemplar_dim={exemplar_dim} but the TSM's features have size "
                                  f"{self.tsm.feature_dim}: drop exemplar_dim or use the matching TSM")
            exemplar_dim = self.tsm.feature_dim
        if exemplar_dim is None:
            raise VITaskError(f"{type(self).__name__} needs tsm=dict(checkpoint=..., config=...) or, with an "
                              "exemplar cache, exemplar_dim=<TSM feature size>")
        self.connector = ExemplarConnector(exemplar_dim, self.llm_hidden_size)
        tag_param_group(self.connector, CONNECTOR_GROUP)
        self.stage = 1

    # ---- stages ---------------------------------------------------------------------------
    def set_stage(self, stage):
        """Stage 1: connector trainable. Stage 2: connector frozen, CRT on (eq. 7).

        Freezing here means no gradient (``requires_grad=False``; the connector also runs under no_grad);
        ``VITaskStageHook`` adds what keeps it bit-identical under every engine (its optimizer group at
        lr = weight_decay = 0: DeepSpeed steps its flat partitions with zero gradients).
        """
        if stage not in (1, 2):
            raise VITaskError(f"stage={stage}: VITask has stages 1 and 2")
        self.stage = stage
        self.connector.requires_grad_(stage == 1)

    def train(self, mode=True):
        super().train(mode)
        if self.tsm is not None:
            self.tsm.eval()  # frozen: no dropout, fixed norm statistics
        return self

    # ---- exemplars --------------------------------------------------------------------------
    def exemplar_features(self, data):
        """TSM features of the batch's images: from the exemplar cache if the batch has them, else the TSM."""
        if "exemplars" in data:
            return data["exemplars"]
        if self.tsm is None or "tsm_pixel_values" not in data:
            raise VITaskError("the batch has neither cached 'exemplars' nor 'tsm_pixel_values' for the TSM: "
                              "configure VITaskDataset with exemplar_cache=... or tsm_img_size=...")
        return self.tsm.extract_features(data["tsm_pixel_values"], kind=feature_kind(self.ep_mode))

    def exemplar_tokens(self, data):
        features = self.exemplar_features(data)
        if self.ep_mode != "cls" and features.ndim != 3:
            raise VITaskError(f"ep_mode={self.ep_mode!r} needs all TSM tokens but the exemplars are one vector "
                              "per image: rebuild the exemplar cache with --kind all")
        if self.ep_mode == "cls" and features.ndim == 3:
            raise VITaskError("ep_mode='cls' needs one CLS feature per image but the exemplars hold all tokens: "
                              "rebuild the exemplar cache with --kind cls")
        if self.stage == 2:
            with torch.no_grad():  # frozen connector
                return self.connector(features)
        return self.connector(features)

    def exemplar_spans(self, input_ids):
        """Per sample, where EP puts its tokens: after the image tokens, or over them for EP_rep."""
        return exemplar_spans(input_ids, self.image_token_id, self.ep_mode)

    # ---- the step -----------------------------------------------------------------------------
    def compute_losses(self, data):
        """All terms of eq. 7 that the current stage uses, unweighted: loss_van, loss_ep, loss_rda, loss_crt."""
        input_ids, mask, positions, labels = (data["input_ids"], data["attention_mask"],
                                              data["position_ids"], data["labels"])
        pixels = self.stack_tiles(data["pixel_values"])
        n_pos = pixels.shape[0]
        with_crt = self.stage == 2 and self.use_crt
        if with_crt and data.get("neg_pixel_values") is not None:
            pixels = torch.cat([pixels, data["neg_pixel_values"].to(pixels.dtype)])
        vit = self.encode_images(pixels)  # one ViT encode per distinct image in the batch

        embeds = self.embed_tokens(input_ids, vit[:n_pos])
        spans = self.exemplar_spans(input_ids)
        plain = (embeds, mask, positions, labels)
        ep = splice_exemplars(embeds, mask, spans, self.exemplar_tokens(data), labels=labels,
                              ignore_index=losses.IGNORE_INDEX)
        ep = (ep[0], ep[1], ep[3], ep[2])  # (embeds, mask, positions, labels) like the others
        neg = (self.embed_tokens(input_ids, vit[data["neg_image_index"]]), mask, positions, labels) if with_crt else None

        if self.shared_prefix:
            bounds = unsupported_reason(self) or layout(input_ids, spans, labels, self.image_token_id)
            if isinstance(bounds, tuple):
                return OrderedDict(shared_prefix_terms(self, plain, ep, neg, *bounds))
            log_once(f"VITask: full passes, no shared prefix: {bounds}")
        return self.full_pass_terms(plain, ep, neg)

    def full_pass_terms(self, plain, ep, neg):
        """Eq. 7's terms from one full LLM pass per sequence (the reference for ``shared_prefix_terms``)."""
        plain, targets = self.response_logits(*plain)
        terms = OrderedDict(loss_van=losses.vanilla_loss(plain, targets))
        ep, _ = self.response_logits(*ep)
        terms["loss_ep"] = losses.exemplar_prompting_loss(ep, targets)
        if self.use_rda:
            terms["loss_rda"] = losses.response_distribution_alignment_loss(plain, ep, self.detach_rda, self.rda_kl)
        if neg is not None:
            neg, _ = self.response_logits(*neg)
            terms["loss_crt"] = losses.contrastive_response_tuning_loss(plain, neg, targets)
        return terms

    def forward(self, data, data_samples=None, mode="loss"):
        if mode != "loss":
            raise NotImplementedError(f"{type(self).__name__} supports mode='loss' only (use VITaskEvalHook / "
                                      "xtuner-vitask eval)")
        terms = self.compute_losses(data)
        values = torch.stack([value.detach() for value in terms.values()])
        if not torch.isfinite(values).all():  # one host sync per step, not one per term
            name, value = next((n, v) for n, v in terms.items() if not torch.isfinite(v))
            raise VITaskError(f"non-finite {name}={value.item()} in the batch with samples "
                              f"{data.get('ids', '?')}: lower the learning rate or check these samples")
        return terms

    def parse_losses(self, losses_dict):
        """Eq. 7 as the optimised total; every term is logged unweighted under its own name."""
        total = losses.vitask_objective(losses_dict, self.alpha, self.beta)
        log_vars = OrderedDict(loss=total.detach())
        log_vars.update((name, value.detach()) for name, value in losses_dict.items())
        return total, log_vars

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """The wrapper's trained tensors (LoRA, mlp1 if trained) + the connector; never the frozen towers or the TSM."""
        to_return = super().state_dict(*args, **kwargs)
        to_return.update((k, v) for k, v in torch.nn.Module.state_dict(self.connector, prefix="connector.").items())
        return to_return


class VITaskInternVL(VITask, InternVL2):
    """InternVL2 + VITask (EP, RDA, CRT), trained in two stages.

    Args:
        model_path, llm_lora, ...: as ``InternVL2`` (vision encoder and mlp1 frozen by default).
        tsm: dict(checkpoint=..., config=..., meta=...) of a trained task-specific model, run frozen
            in the loop; ``checkpoint`` may be a glob (the newest match is used, e.g. mmengine's
            ``best_macro_f1_epoch_*.pth``); ``meta`` (the data's meta.json) is checked against the
            TSM's classes. None when every batch brings cached exemplars (``exemplar_dim`` then required).
        exemplar_dim: TSM feature size (checked against the TSM when both are given).
        ep_mode: 'cls' (one CLS token beside the image tokens, the paper's default), 'all' (all
            TSM patch tokens beside them) or 'rep' (TSM tokens replace the image tokens), Fig. 2.
        alpha, beta: weights of L_RDA and L_CRT in eq. 7.
        use_rda, use_crt: switch the terms off for the Table 2 ablation rows.
        detach_rda: False gives RDA* (gradient flows into the exemplar-prompted branch).
        rda_kl: 'reverse' = eq. 3 as printed, KL(plain || exemplar-prompted); 'forward' swaps the sides
            (knowledge distillation's direction; not the paper: a diagnostic of benchmarks/ablation.py).
        shared_prefix: run the plain, EP and CRT-negative passes on one computation of their common prefix
            (``models/shared_prefix.py``; same losses and gradients, less time and memory). False runs
            full passes (the reference); combinations that cannot share fall back to them (logged once).
    """


    def __init__(self, model_path, *, tsm=None, exemplar_dim=None, ep_mode="cls", alpha=1.0, beta=1.0,
                 use_rda=True, use_crt=True, detach_rda=True, rda_kl="reverse", shared_prefix=True, freeze_mlp1=True,
                 freeze_visual_encoder=True, **kwargs):
        check_vitask_arguments(ep_mode, alpha, beta, rda_kl)
        super().__init__(model_path, freeze_mlp1=freeze_mlp1, freeze_visual_encoder=freeze_visual_encoder, **kwargs)
        self._init_vitask(tsm, exemplar_dim, ep_mode, alpha, beta, use_rda, use_crt, detach_rda, shared_prefix,
                          rda_kl)

    # ---- the adapter (see VITask) -------------------------------------------------------------
    @property
    def image_token_id(self):
        return self.model.img_context_token_id

    @property
    def llm_hidden_size(self):
        return self.model.language_model.get_input_embeddings().embedding_dim

    @property
    def image_features_trainable(self):
        return not self.vision_frozen
