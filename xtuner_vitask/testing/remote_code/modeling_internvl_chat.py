"""The tiny InternVL2-compatible chat model: vision tower -> pixel shuffle -> MLP -> causal LM.

Attribute and method names are the ones XTuner and InternVL tools use on
InternVL2's remote code: ``vision_model``, ``mlp1``, ``language_model``,
``img_context_token_id``, ``num_image_token``, ``template``,
``system_message``, ``pixel_shuffle``, ``extract_feature``, ``forward``,
``generate``, ``chat`` and ``batch_chat``.
"""
import importlib.util
import warnings

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import get_conv_template
from .modeling_intern_vit import InternVisionModel

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
FLASH_ATTENTION = "flash_attention_2"


def flash_attention_usable():
    """flash-attn only helps (and only runs) when it is installed and a GPU is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def choose_llm_attention(config):
    """Attention implementation for the LLM: the LLM's own setting, else the top-level one.

    XTuner writes ``flash_attention_2`` into ``llm_config`` unconditionally; where
    flash-attn cannot run, the request falls back to the top-level choice
    (``sdpa`` by default) instead of failing. ``None`` lets transformers decide.
    """
    top_level = config._attn_implementation_internal
    requested = config.llm_config._attn_implementation_internal or top_level
    if requested is None and config.use_flash_attn:
        requested = FLASH_ATTENTION
    if requested == FLASH_ATTENTION and not flash_attention_usable():
        requested = top_level if top_level in ("eager", "sdpa") else "sdpa"
    return requested


def build_language_model(llm_config, attn_implementation):
    """The transformers causal LM named by ``llm_config.architectures[0]``."""
    architecture = (llm_config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        return AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn_implementation)
    return model_class._from_config(llm_config, attn_implementation=attn_implementation)


class InternVLChatModel(PreTrainedModel):
    """InternVL2's chat model layout around a small ViT and any transformers causal LM."""

    config_class = InternVLChatConfig
    # save_pretrained copies this file (and the ones it imports) and writes auto_map,
    # so an exported or re-saved model folder loads on its own.
    _auto_class = "AutoModel"
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn_2 = True
    _no_split_modules = [
        "InternVisionEncoderLayer",
        "LlamaDecoderLayer",
        "Phi3DecoderLayer",
        "Qwen2DecoderLayer",
    ]

    def __init__(self, config, vision_model=None, language_model=None):
        super().__init__(config)
        vision_config = config.vision_config
        image_size = config.force_image_size or vision_config.image_size
        self.patch_size = vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // self.patch_size) ** 2 * (config.downsample_ratio**2))
        self.system_message = get_conv_template(self.template).system_message if self.template else ""

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(vision_config)
        if language_model is None:
            attn_implementation = choose_llm_attention(config)
            language_model = build_language_model(config.llm_config, attn_implementation)
            # Keep the config truthful about what runs (it may be saved again).
            config.llm_config._attn_implementation = language_model.config._attn_implementation
        self.language_model = language_model

        vit_hidden = vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        fold = int(round(1 / config.downsample_ratio)) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden * fold),
            nn.Linear(vit_hidden * fold, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.img_context_token_id = None  # set by the caller (XTuner) or by chat()
        self.post_init()

    def _init_weights(self, module):
        std = self.config.llm_config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ----------------------------------------------------------------- vision
    def pixel_shuffle(self, x, scale_factor=0.5):
        """Fold each ``k x k`` block of the ``(n, rows, cols, c)`` grid into channels, ``k = 1/scale_factor``."""
        n, rows, cols, channels = x.shape
        k = int(round(1 / scale_factor))
        if rows % k or cols % k:
            raise ValueError(f"pixel_shuffle: a {rows}x{cols} grid does not fold by {k}")
        x = x.reshape(n, rows, cols // k, channels * k)  # neighbours along the 3rd axis
        x = x.transpose(1, 2).reshape(n, cols // k, rows // k, channels * k * k)  # then along the 2nd
        if self.ps_version != "v1":
            x = x.transpose(1, 2)  # back to (rows, cols) order
        return x.contiguous()

    def extract_feature(self, pixel_values):
        """``(tiles, 3, H, W)`` pixels -> ``(tiles, num_image_token, llm_hidden)`` LLM-space embeddings."""
        pixel_values = pixel_values.to(device=self.vision_model.device, dtype=self.vision_model.dtype)
        if self.select_layer == -1:
            vit_embeds = self.vision_model(
                pixel_values=pixel_values, output_hidden_states=False, return_dict=True
            ).last_hidden_state
        else:
            vit_embeds = self.vision_model(
                pixel_values=pixel_values, output_hidden_states=True, return_dict=True
            ).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # drop CLS
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _merge_image_embeds(self, input_ids, input_embeds, vit_embeds):
        """Put the image embeddings at the ``<IMG_CONTEXT>`` positions of ``input_embeds`` (out of place)."""
        if self.img_context_token_id is None:
            raise ValueError(
                "img_context_token_id is not set: set model.img_context_token_id = "
                "tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')"
            )
        selected = input_ids == self.img_context_token_id
        n_slots = int(selected.sum())
        image_tokens = vit_embeds.reshape(-1, input_embeds.shape[-1]).to(input_embeds.dtype)
        if n_slots != image_tokens.shape[0]:
            if n_slots > image_tokens.shape[0]:
                raise ValueError(
                    f"{n_slots} <IMG_CONTEXT> tokens in input_ids but only {image_tokens.shape[0]} image "
                    f"embeddings ({self.num_image_token} per tile)"
                )
            # A sequence cut at max_length keeps only its first image tokens.
            warnings.warn(
                f"{n_slots} <IMG_CONTEXT> tokens for {image_tokens.shape[0]} image embeddings; "
                "using the first ones"
            )
            image_tokens = image_tokens[:n_slots]
        return input_embeds.masked_scatter(selected.unsqueeze(-1).to(input_embeds.device), image_tokens)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        image_flags=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Causal LM loss/logits with the images placed at ``<IMG_CONTEXT>``.

        ``image_flags`` (one per tile) marks real images; tiles flagged 0 (text-only
        samples padded with a blank image) are encoded but not placed.
        """
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            vit_embeds = self.extract_feature(pixel_values)
            if image_flags is not None:
                vit_embeds = vit_embeds[image_flags.reshape(-1).to(vit_embeds.device) == 1]
            input_embeds = self._merge_image_embeds(input_ids, input_embeds, vit_embeds)

        outputs = self.language_model(
            inputs_embeds=input_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = outputs.logits
        loss = None
        if labels is not None:
            # Token t predicts token t+1; -100 marks positions without a target.
            shifted_logits = logits[..., :-1, :].float().reshape(-1, logits.shape[-1])
            shifted_labels = labels[..., 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)

        if not return_dict:
            output = (logits,) + tuple(
                v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions) if v is not None
            )
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        visual_features=None,
        generation_config=None,
        output_hidden_states=None,
        **generate_kwargs,
    ):
        """Generate from a prompt whose ``<IMG_CONTEXT>`` tokens are replaced by image embeddings."""
        device = self.language_model.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        if visual_features is not None or pixel_values is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            input_embeds = self._merge_image_embeds(input_ids, input_embeds, vit_embeds)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        generate_kwargs.setdefault("use_cache", True)
        return self.language_model.generate(
            inputs_embeds=input_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            output_hidden_states=output_hidden_states,
            **generate_kwargs,
        )

    # ------------------------------------------------------------------- chat
    def _build_query(self, question, history, num_patches_list, img_start, img_end, img_context):
        template = get_conv_template(self.template)
        template.system_message = self.system_message
        for old_question, old_answer in history or []:
            template.append_message(template.roles[0], old_question)
            template.append_message(template.roles[1], old_answer)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        for num_patches in num_patches_list:
            image_tokens = img_start + img_context * (self.num_image_token * num_patches) + img_end
            query = query.replace("<image>", image_tokens, 1)
        return template, query

    @staticmethod
    def _generation_arguments(generation_config, tokenizer, template):
        """(generation_config object or None, keyword overrides) with the template's stop token as eos."""
        config_object = generation_config if isinstance(generation_config, GenerationConfig) else None
        overrides = {} if config_object is not None else dict(generation_config or {})
        overrides["eos_token_id"] = tokenizer.convert_tokens_to_ids(template.sep.strip())
        if tokenizer.pad_token_id is not None:
            overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        return config_object, overrides

    @staticmethod
    def _cut_reply(text, template):
        for stop in template.stop_strings():
            text = text.split(stop)[0]
        return text.strip()

    def chat(
        self,
        tokenizer,
        pixel_values,
        question,
        generation_config,
        history=None,
        return_history=False,
        num_patches_list=None,
        IMG_START_TOKEN=IMG_START_TOKEN,
        IMG_END_TOKEN=IMG_END_TOKEN,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose=False,
    ):
        """Answer ``question`` about the tiles in ``pixel_values`` (or text only when it is None)."""
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches_list sums to {sum(num_patches_list)} but pixel_values has {pixel_values.shape[0]} tiles"
            )
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        template, query = self._build_query(
            question, history, num_patches_list, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN
        )
        model_inputs = tokenizer(query, return_tensors="pt")
        config_object, overrides = self._generation_arguments(generation_config, tokenizer, template)
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"],
            attention_mask=model_inputs["attention_mask"],
            generation_config=config_object,
            **overrides,
        )
        response = self._cut_reply(tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0], template)
        history = list(history or []) + [(question, response)]
        if verbose:
            shown = query.replace(IMG_CONTEXT_TOKEN * self.num_image_token, "").replace(IMG_CONTEXT_TOKEN, "")
            print(shown, response)
        return (response, history) if return_history else response

    def batch_chat(
        self,
        tokenizer,
        pixel_values,
        questions,
        generation_config,
        num_patches_list=None,
        history=None,
        return_history=False,
        IMG_START_TOKEN=IMG_START_TOKEN,
        IMG_END_TOKEN=IMG_END_TOKEN,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose=False,
        image_counts=None,
    ):
        """One answer per question; question ``i`` sees ``num_patches_list[i]`` consecutive tiles."""
        if history is not None or return_history:
            raise NotImplementedError("batch_chat keeps no history; use chat() for multi-turn")
        if image_counts is not None:
            num_patches_list = image_counts
        if num_patches_list is None:
            num_patches_list = [1] * len(questions) if pixel_values is not None else [0] * len(questions)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        template = None
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and num_patches and "<image>" not in question:
                question = "<image>\n" + question
            template, query = self._build_query(
                question, None, [num_patches] if num_patches else [], IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN
            )
            queries.append(query)
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues at the right end
        try:
            model_inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = padding_side
        config_object, overrides = self._generation_arguments(generation_config, tokenizer, template)
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"],
            attention_mask=model_inputs["attention_mask"],
            generation_config=config_object,
            **overrides,
        )
        responses = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        if verbose:
            for question, response in zip(questions, responses):
                print(question, response)
        return [self._cut_reply(response, template) for response in responses]
