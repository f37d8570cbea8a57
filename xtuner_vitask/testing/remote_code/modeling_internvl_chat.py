"""InternVL2 chat model: InternViT -> pixel shuffle -> ``mlp1`` -> causal LM, with the interface of
InternVL2's ``modeling_internvl_chat.py``.

Kept as InternVL2 has it, because XTuner and this plugin rely on it:
- ``__init__(config, vision_model=None, language_model=None, use_flash_attn=True)``: ``use_flash_attn``
  (a ``from_pretrained`` keyword) falls back to False when flash-attn does not import, and is written into
  ``config.vision_config.use_flash_attn`` and ``config.llm_config.attn_implementation`` ("flash_attention_2"
  or "eager") before the LLM is built; the LLM class comes from ``llm_config.architectures[0]``;
- no ``_supports_sdpa`` (only ``_supports_flash_attn_2``), no ``_auto_class`` (``save_pretrained``
  writes no ``auto_map`` and copies no code), no ``post_init`` (weights come from the checkpoint);
- ``forward`` needs ``image_flags``; ``img_context_token_id`` is set by the caller or by ``chat``;
- ``chat``, ``batch_chat`` and ``generate`` have InternVL2's signatures; ``generation_config`` of
  ``chat``/``batch_chat`` is a dict that gets ``eos_token_id`` (the template's ``sep``) written into it,
  ``chat`` appends to the ``history`` list it is given and ``batch_chat`` leaves the tokenizer
  left-padded, as InternVL2's do.
Differences: inputs go to the model's device instead of ``.cuda()`` (this tiny model runs on CPUs); a
Phi3 LLM is transformers' class (InternVL2-4B ships its own copy of it); ``generate`` forwards
``return_dict`` to the LLM's ``generate`` only when it is given -- InternVL2's always does, which
transformers' Qwen2/Llama classes (InternVL2-1B, -40B) refuse in transformers 4.48 ("got multiple values
for keyword argument 'return_dict'"), while InternLM2's own ``prepare_inputs_for_generation`` drops it.
"""
import warnings

import torch
import transformers
from packaging import version
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import LlamaForCausalLM, Phi3ForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import get_conv_template
from .modeling_intern_vit import InternVisionModel, has_flash_attn
from .modeling_internlm2 import InternLM2ForCausalLM

LLM_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _supports_flash_attn_2 = True
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionModel", "LlamaDecoderLayer", "InternLM2DecoderLayer",
                         "Phi3DecoderLayer", "Qwen2DecoderLayer"]

    def __init__(self, config, vision_model=None, language_model=None, use_flash_attn=True):
        super().__init__(config)
        assert version.parse(transformers.__version__) >= version.parse("4.37.0")
        image_size = config.force_image_size or config.vision_config.image_size
        self.patch_size = config.vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.num_image_token = int((image_size // self.patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.llm_arch_name = config.llm_config.architectures[0]
        use_flash_attn = use_flash_attn if has_flash_attn else False
        config.vision_config.use_flash_attn = bool(use_flash_attn)
        config.llm_config.attn_implementation = "flash_attention_2" if use_flash_attn else "eager"

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        if language_model is not None:
            self.language_model = language_model
        elif self.llm_arch_name in LLM_CLASSES:
            self.language_model = LLM_CLASSES[self.llm_arch_name](config.llm_config)
        else:
            raise NotImplementedError(f"{self.llm_arch_name} is not implemented.")

        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        folded = vit_hidden * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(folded), nn.Linear(folded, llm_hidden), nn.GELU(),
                                  nn.Linear(llm_hidden, llm_hidden))
        self.img_context_token_id = None
        self.conv_template = get_conv_template(self.template)
        self.system_message = self.conv_template.system_message

    # ------------------------------------------------------------------ training forward
    def forward(self, pixel_values, input_ids=None, attention_mask=None, position_ids=None, image_flags=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        image_flags = image_flags.squeeze(-1)
        input_embeds = self.language_model.get_input_embeddings()(input_ids).clone()
        vit_embeds = self.extract_feature(pixel_values)[image_flags == 1]
        batch, length, channels = input_embeds.shape
        input_embeds = input_embeds.reshape(batch * length, channels)
        selected = input_ids.reshape(batch * length) == self.img_context_token_id
        image_rows = vit_embeds.reshape(-1, channels)
        ignore = image_rows.shape[0] != int(selected.sum())
        if ignore:  # InternVL2 trains on what fits and zeroes the loss of such a batch
            warnings.warn(f"{int(selected.sum())} <IMG_CONTEXT> tokens for {image_rows.shape[0]} image embeddings")
            n_slots = int(selected.sum())
            if image_rows.shape[0] < n_slots:
                selected = selected & (selected.cumsum(0) <= image_rows.shape[0])
            image_rows = image_rows[:int(selected.sum())]
        input_embeds[selected] = input_embeds[selected] * 0.0 + image_rows.to(input_embeds.dtype)
        input_embeds = input_embeds.reshape(batch, length, channels)

        outputs = self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values,
                                      use_cache=use_cache, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict)
        logits = outputs.logits
        loss = None
        if labels is not None:
            shifted = logits[..., :-1, :].contiguous().view(-1, self.language_model.config.vocab_size)
            loss = CrossEntropyLoss()(shifted, labels[..., 1:].contiguous().view(-1).to(shifted.device))
            if ignore:
                loss = loss * 0.0
        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # ------------------------------------------------------------------ vision
    def pixel_shuffle(self, x, scale_factor=0.5):
        """(n, w, h, c) -> (n, w*s, h*s, c/s^2): each 1/s x 1/s block of patches folded into channels."""
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version == "v1":
            warnings.warn("In ps_version 'v1', the height and width have not been swapped back, "
                          "which results in a transposed image.")
        else:
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        """(tiles, 3, H, W) -> (tiles, num_image_token, llm_hidden)."""
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=False,
                                           return_dict=True).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True,
                                           return_dict=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # drop CLS
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    # ------------------------------------------------------------------ chat
    def _query(self, template, question, num_patches_list, img_start, img_context, img_end):
        query = template.get_prompt()
        for num_patches in num_patches_list:
            image_tokens = img_start + img_context * (self.num_image_token * num_patches) + img_end
            query = query.replace("<image>", image_tokens, 1)
        return query

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list=None,
                   history=None, return_history=False, IMG_START_TOKEN="<img>", IMG_END_TOKEN="</img>",
                   IMG_CONTEXT_TOKEN="<IMG_CONTEXT>", verbose=False, image_counts=None):
        if history is not None or return_history:
            raise NotImplementedError("multi-turn chat is not supported in batch_chat")
        if image_counts is not None:
            warnings.warn("`image_counts` is deprecated, use `num_patches_list`")
            num_patches_list = image_counts
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if verbose and pixel_values is not None:
            print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and "<image>" not in question:
                question = "<image>\n" + question
            template = get_conv_template(self.template)
            template.append_message(template.roles[0], question)
            template.append_message(template.roles[1], None)
            queries.append(self._query(template, question, [num_patches], IMG_START_TOKEN, IMG_CONTEXT_TOKEN,
                                       IMG_END_TOKEN))
        tokenizer.padding_side = "left"
        model_inputs = tokenizer(queries, return_tensors="pt", padding=True)
        generation_config["eos_token_id"] = tokenizer.convert_tokens_to_ids(template.sep)
        output = self.generate(pixel_values=pixel_values, input_ids=model_inputs["input_ids"].to(self.device),
                               attention_mask=model_inputs["attention_mask"].to(self.device), **generation_config)
        responses = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [response.split(template.sep)[0].strip() for response in responses]

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             num_patches_list=None, IMG_START_TOKEN="<img>", IMG_END_TOKEN="</img>",
             IMG_CONTEXT_TOKEN="<IMG_CONTEXT>", verbose=False):
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        assert pixel_values is None or len(pixel_values) == sum(num_patches_list)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        template = get_conv_template(self.template)
        template.system_message = self.system_message
        eos_token_id = tokenizer.convert_tokens_to_ids(template.sep)
        history = [] if history is None else history
        for old_question, old_answer in history:
            template.append_message(template.roles[0], old_question)
            template.append_message(template.roles[1], old_answer)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        if verbose and pixel_values is not None:
            print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
        query = self._query(template, question, num_patches_list, IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN)
        model_inputs = tokenizer(query, return_tensors="pt")
        generation_config["eos_token_id"] = eos_token_id
        output = self.generate(pixel_values=pixel_values, input_ids=model_inputs["input_ids"].to(self.device),
                               attention_mask=model_inputs["attention_mask"].to(self.device), **generation_config)
        response = tokenizer.batch_decode(output, skip_special_tokens=True)[0].split(template.sep)[0].strip()
        history.append((question, response))
        if return_history:
            return response, history
        if verbose:
            shown = query.replace(IMG_CONTEXT_TOKEN, "").replace(f"{IMG_START_TOKEN}{IMG_END_TOKEN}", "<image>")
            print(shown, response)
        return response

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 generation_config=None, output_hidden_states=None, return_dict=None, **generate_kwargs):
        assert self.img_context_token_id is not None
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            batch, length, channels = input_embeds.shape
            input_embeds = input_embeds.reshape(batch * length, channels)
            selected = input_ids.reshape(batch * length) == self.img_context_token_id
            assert selected.sum() != 0
            input_embeds[selected] = vit_embeds.reshape(-1, channels).to(input_embeds.device, input_embeds.dtype)
            input_embeds = input_embeds.reshape(batch, length, channels)
        if return_dict is not None:  # InternVL2 always forwards it (see the module docstring)
            generate_kwargs["return_dict"] = return_dict
        return self.language_model.generate(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                            generation_config=generation_config,
                                            output_hidden_states=output_hidden_states, use_cache=True,
                                            **generate_kwargs)

