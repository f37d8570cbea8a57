"""Chat formats of every InternVL2 / InternVL2.5 language model, keyed by the
``template`` field of the checkpoint's config.json (as InternVL's own
``conversation.py`` names them), in XTuner's PROMPT_TEMPLATE shape.

XTuner 0.2.0's InternVL dataset only knows InternLM2 and Phi3 and picks the
format from the LLM architecture; the model config already says which chat
format it was trained with, so we key on that instead.
"""
from mmengine.config import ConfigDict

from ..errors import VITaskError

_INTERNVL_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
_INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# InternVL joins system, turns and separators without newlines (MPT style),
# except InternVL2.5, which ends every message with "<|im_end|>\n".
_CHATML = dict(
    SYSTEM="<|im_start|>system\n{system}<|im_end|>",
    INSTRUCTION="<|im_start|>user\n{input}<|im_end|><|im_start|>assistant\n",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    STOP_WORDS=["<|im_end|>"],
    DEFAULT_SYSTEM=_INTERNVL_SYSTEM,
)

INTERNVL_TEMPLATES = {
    "internlm2-chat": dict(_CHATML),
    "Hermes-2": dict(_CHATML, STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    "phi3-chat": dict(
        SYSTEM="<|system|>\n{system}<|end|>",
        INSTRUCTION="<|user|>\n{input}<|end|><|assistant|>\n",
        SUFFIX="<|end|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|end|>"],
        DEFAULT_SYSTEM=_INTERNVL_SYSTEM,
    ),
    "internvl2_5": dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>\n",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|im_end|>"],
        DEFAULT_SYSTEM=_INTERNVL2_5_SYSTEM,
    ),
}


def chat_template(name):
    """A fresh (mutable) copy of the chat format called ``name`` in config.json."""
    if name not in INTERNVL_TEMPLATES:
        raise VITaskError(
            f"unknown InternVL chat template {name!r} in the model's config.json; "
            f"known: {', '.join(INTERNVL_TEMPLATES)} (pass template=... to the dataset to override)"
        )
    return ConfigDict(INTERNVL_TEMPLATES[name])
