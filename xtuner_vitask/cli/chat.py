"""Chat about an image with an exported model (interactive, like `xtuner chat`; --prompt for one answer)."""
import os
import sys

from ..errors import VITaskError

EXIT_WORDS = ("exit", "quit")


def add_arguments(parser):
    parser.add_argument("model_dir", help="folder written by `xtuner convert pth_to_hf` (or any InternVL2 folder)")
    parser.add_argument("--image", required=True, help="image file to talk about")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit (for scripts)")
    parser.add_argument("--prompt-template", default=None,
                        help="chat format: an InternVL template name (Hermes-2, internlm2-chat, phi3-chat, "
                             "internvl2_5) or an XTuner PROMPT_TEMPLATE name (default: config.json's template)")
    parser.add_argument("--system", default=None, help="system text (default: the template's, as in training)")
    ep = parser.add_mutually_exclusive_group()
    ep.add_argument("--ep", dest="use_ep", action="store_true", default=None,
                    help="exemplar prompting with the export's TSM (default when the export has one)")
    ep.add_argument("--no-ep", dest="use_ep", action="store_false", help="the VLM alone")
    parser.add_argument("--max-tiles", type=int, default=1, help="image tiles (1 = as VITask trains)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-streamer", action="store_true", help="print each answer when complete")
    parser.add_argument("--seed", type=int, default=0)


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


def read_image(path):
    from ..data.images import read_image as read_8bit_rgb  # 16-bit/float images rescaled as in training

    return read_8bit_rgb(path, "RGB")


def internvl_transform(size):
    """InternVL's tile preprocessing (as the project's InternVL2Dataset): RGB, bicubic resize, ImageNet norm."""
    import torchvision.transforms as T

    from ..datasets.internvl import InternVL2Dataset

    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(mean=InternVL2Dataset.IMAGENET_MEAN, std=InternVL2Dataset.IMAGENET_STD)])


class ChatSession:
    """A conversation about one image, prompts built like the training prompts (XTuner's format)."""

    def __init__(self, model_dir, image_path, prompt_template=None, system=None, use_ep=None, max_tiles=1):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from xtuner.dataset.internvl_dataset import dynamic_preprocess

        from ..datasets.internvl import InternVL2Dataset
        from ..export.folder import inspect_export
        from ..models.internvl import resolve_dtype

        info = inspect_export(model_dir, need_ep=bool(use_ep))
        self.image = read_image(image_path)
        self.use_ep = info.has_ep if use_ep is None else use_ep
        self.has_ep = info.has_ep
        self.model = AutoModel.from_pretrained(model_dir, trust_remote_code=True,
                                               torch_dtype=resolve_dtype("auto")).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.template = resolve_template(prompt_template, info.config.get("template"))
        self.system = system if system is not None else self.template.get("DEFAULT_SYSTEM", "")
        self.model.img_context_token_id = self.tokenizer.convert_tokens_to_ids(InternVL2Dataset.IMG_CONTEXT_TOKEN)
        cfg = self.model.config
        size = cfg.force_image_size or cfg.vision_config.image_size
        transform = internvl_transform(size)
        tiles = dynamic_preprocess(self.image, cfg.min_dynamic_patch, max(1, max_tiles), size, cfg.use_thumbnail)
        self.pixel_values = torch.stack([transform(t) for t in tiles]).to(self.model.vision_model.dtype)
        self.image_tokens = (InternVL2Dataset.IMG_START_TOKEN
                             + InternVL2Dataset.IMG_CONTEXT_TOKEN * (self.model.num_image_token * len(tiles))
                             + InternVL2Dataset.IMG_END_TOKEN)
        self.tsm_pixel_values = self.model.tsm_preprocess(self.image)[None] if self.use_ep else None
        self.reset()

    def reset(self):
        self.ids, self.turn = [], 0

    def stop_ids(self):
        ids = []
        for word in list(self.template.get("STOP_WORDS", [])) + [self.tokenizer.eos_token]:
            tid = self.tokenizer.convert_tokens_to_ids(word) if word else None
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def ask(self, text, max_new_tokens=512, temperature=0.0, top_p=0.75, top_k=40, repetition_penalty=1.0,
            streamer=None):
        import torch

        text = text.replace("<image>", "").strip()
        if self.turn == 0:
            with_system = self.system and "SYSTEM" in self.template
            prompt = self.template["SYSTEM"].format(system=self.system) if with_system else ""
            prompt += self.template["INSTRUCTION"].format(input=f"{self.image_tokens}\n{text}", round=1)
            self.ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            prompt = self.template["INSTRUCTION"].format(input=text, round=self.turn + 1)
            self.ids += self.tokenizer.encode(prompt, add_special_tokens=False)
        input_ids = torch.tensor([self.ids])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=repetition_penalty,
                      eos_token_id=self.stop_ids() or None, pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        if self.has_ep:
            kwargs["use_ep"] = self.use_ep
            if self.use_ep:
                kwargs["tsm_pixel_values"] = self.tsm_pixel_values
        with torch.no_grad():
            out = self.model.generate(pixel_values=self.pixel_values, input_ids=input_ids,
                                      attention_mask=torch.ones_like(input_ids), **kwargs)
        answer = self.tokenizer.decode(out[0], skip_special_tokens=True)
        for word in self.template.get("STOP_WORDS", []):
            answer = answer.split(word)[0]
        answer = answer.strip()
        suffix = self.template.get("SUFFIX", "")
        self.ids += self.tokenizer.encode(answer + suffix, add_special_tokens=False)
        self.turn += 1
        return answer


def get_input():
    """Lines until an empty one (as `xtuner chat`)."""
    print("\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> ", end="", flush=True)
    return "\n".join(iter(input, ""))


def run(args):
    import torch
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    session = ChatSession(args.model_dir, args.image, args.prompt_template, args.system, args.use_ep, args.max_tiles)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               repetition_penalty=args.repetition_penalty)
    if args.prompt is not None:
        print(session.ask(args.prompt, **gen))
        return 0
    streamer = None if args.no_streamer else TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"chatting with {os.path.basename(os.path.normpath(args.model_dir))} about {args.image} "
          f"(EP {'on' if session.use_ep else 'off'})")
    while True:
        try:
            text = get_input()
        except EOFError:
            print()
            return 0
        if text.strip().lower() in EXIT_WORDS:
            print("Log: Exit!")
            return 0
        if text.strip() == "RESET":
            session.reset()
            print("Log: History responses have been removed!")
            continue
        if not text.strip():
            continue
        answer = session.ask(text, streamer=streamer, **gen)
        if streamer is None:
            print(answer)
        sys.stdout.flush()
