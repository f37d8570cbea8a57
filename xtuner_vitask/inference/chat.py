"""A conversation about one image with an exported model, prompts built exactly like the training
prompts (the evaluation's :class:`~xtuner_vitask.evaluation.inputs.ModelInputs`)."""
from ..errors import VITaskError
from ..evaluation.inputs import ModelInputs, check_image_file, read_image

IMAGE_HINT = "pass a PNG, JPEG or TIFF file with --image"


def resolve_template(name, config_template):
    """A PROMPT_TEMPLATE-style dict: InternVL's template names first, then XTuner's."""
    from ..datasets.templates import INTERNVL_TEMPLATES, chat_template

    name = name or config_template
    if name in INTERNVL_TEMPLATES:
        return chat_template(name)
    from xtuner.utils import PROMPT_TEMPLATE

    if name in PROMPT_TEMPLATE:
        return dict(PROMPT_TEMPLATE[name])
    raise VITaskError(f"--prompt-template {name!r} is unknown: use one of {', '.join(INTERNVL_TEMPLATES)} or an "
                      "XTuner PROMPT_TEMPLATE name")


class ChatSession:
    """A conversation about one image (the image goes with the first question, as in training).

    Args:
        model_dir: an export folder (or any InternVL2 folder).
        image_path: the image to talk about.
        prompt_template: an InternVL template name or an XTuner PROMPT_TEMPLATE name (default: the
            model's); system: system text (default: the template's, as in training).
        use_ep: None = EP when the export has a TSM.
        max_tiles: image tiles (1 = as VITask trains).
    """

    def __init__(self, model_dir, image_path, prompt_template=None, system=None, use_ep=None, max_tiles=1,
                 attn_implementation="auto"):
        import torch
        from transformers import AutoModel

        from ..export.folder import inspect_export
        from ..models.attention import prepare_attention
        from ..models.internvl import resolve_dtype

        info = inspect_export(model_dir, need_ep=bool(use_ep))
        check_image_file(image_path, IMAGE_HINT)
        image = read_image(image_path)
        template = resolve_template(prompt_template, info.config.get("template"))
        self.has_ep = info.has_ep
        self.use_ep = info.has_ep if use_ep is None else bool(use_ep)
        config, _, attention_kwargs = prepare_attention(model_dir, attn_implementation)  # per LLM, as training
        self.model = AutoModel.from_pretrained(model_dir, config=config, trust_remote_code=True,
                                               torch_dtype=resolve_dtype("auto"), **attention_kwargs).eval()
        self.inputs = ModelInputs.for_model(model_dir, template=template, system=system, max_tiles=max_tiles,
                                            tsm_transform=self.model.tsm_preprocess if self.use_ep else None)
        self.tokenizer = self.inputs.tokenizer
        self.model.img_context_token_id = self.inputs.img_context_id
        self.pixel_values = self.inputs.tiles(image).to(self.model.vision_model.dtype)
        self.tsm_pixel_values = self.inputs.tsm_pixels(image)[None] if self.use_ep else None
        self._torch = torch
        self.reset()

    def reset(self):
        """Forget the conversation (the image comes with the next question again)."""
        self.history = []

    def prompt_ids(self, text):
        """Token ids of the conversation so far plus the question ``text``, up to where the answer starts."""
        text = text.replace("<image>", "").strip()
        human = {"from": "human", "value": text if self.history else f"<image>\n{text}"}
        return human, self.inputs.prompt_ids(self.history + [human], self.pixel_values.shape[0])

    def ask(self, text, max_new_tokens=512, temperature=0.0, top_p=0.75, top_k=40, repetition_penalty=1.0,
            streamer=None):
        torch = self._torch
        human, ids = self.prompt_ids(text)
        input_ids = torch.tensor([ids])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=repetition_penalty,
                      eos_token_id=self.inputs.stop_ids() or None, pad_token_id=self.tokenizer.pad_token_id,
                      streamer=streamer)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        if self.has_ep:
            kwargs["use_ep"] = self.use_ep
            if self.use_ep:
                kwargs["tsm_pixel_values"] = self.tsm_pixel_values
        with torch.no_grad():
            out = self.model.generate(pixel_values=self.pixel_values, input_ids=input_ids,
                                      attention_mask=torch.ones_like(input_ids), **kwargs)
        answer = self.inputs.clean_answer(self.tokenizer.decode(out[0], skip_special_tokens=True))
        self.history += [human, {"from": "gpt", "value": answer}]
        return answer
