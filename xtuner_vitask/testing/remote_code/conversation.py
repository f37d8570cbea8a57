"""Conversation templates of the InternVL2 / InternVL2.5 family, keyed by config.json's ``template``.

Same names, system messages, roles and separators as InternVL's ``conversation.py`` for the templates
its InternVL2 checkpoints use; every one of them joins turns MPT-style: the system block and each
finished message end with ``sep``, an open turn ends with the bare role (where the model continues).
"""
import copy
import dataclasses
from enum import IntEnum, auto
from typing import List, Optional, Tuple


class SeparatorStyle(IntEnum):
    MPT = auto()


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: Tuple[str, str] = ("USER", "ASSISTANT")
    messages: List[list] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.MPT
    sep: str = "\n"
    sep2: Optional[str] = None
    stop_str: Optional[str] = None
    stop_token_ids: Optional[List[int]] = None

    def get_prompt(self):
        if self.sep_style != SeparatorStyle.MPT:
            raise ValueError(f"unsupported separator style {self.sep_style!r}")
        parts = [self.system_template.format(system_message=self.system_message) + self.sep]
        for role, message in self.messages:
            if message:
                text = message[0] if isinstance(message, tuple) else message
                parts.append(role + text + self.sep)
            else:
                parts.append(role)
        return "".join(parts)

    def set_system_message(self, system_message):
        self.system_message = system_message

    def append_message(self, role, message):
        self.messages.append([role, message])

    def update_last_message(self, message):
        self.messages[-1][1] = message

    def copy(self):
        return copy.deepcopy(self)

    def dict(self):
        return {"template_name": self.name, "system_message": self.system_message, "roles": self.roles,
                "messages": self.messages, "offset": self.offset}


conv_templates = {}


def register_conv_template(template, override=False):
    if template.name in conv_templates and not override:
        raise ValueError(f"conversation template {template.name!r} is already registered")
    conv_templates[template.name] = template


def get_conv_template(name):
    return conv_templates[name].copy()


# The system message InternVL2 models were trained with (InternVL2.5 has its own).
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

register_conv_template(Conversation(
    name="Hermes-2", system_template="<|im_start|>system\n{system_message}", system_message=INTERNVL2_SYSTEM,
    roles=_CHATML_ROLES, sep="<|im_end|>", stop_str="<|endoftext|>"))
register_conv_template(Conversation(
    name="internlm2-chat", system_template="<|im_start|>system\n{system_message}",
    system_message=INTERNVL2_SYSTEM, roles=_CHATML_ROLES, sep="<|im_end|>"))
register_conv_template(Conversation(
    name="phi3-chat", system_template="<|system|>\n{system_message}", system_message=INTERNVL2_SYSTEM,
    roles=("<|user|>\n", "<|assistant|>\n"), sep="<|end|>"))
register_conv_template(Conversation(
    name="internvl2_5", system_template="<|im_start|>system\n{system_message}",
    system_message=INTERNVL2_5_SYSTEM, roles=_CHATML_ROLES, sep="<|im_end|>\n"))
