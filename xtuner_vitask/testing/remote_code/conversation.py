"""Prompt templates of the InternVL2 family, as a small self-contained module.

Every template here joins turns the same way: the system block, then for each
turn ``role + message + sep`` (an open turn ends with the bare role, which is
where the model continues). ``sep.strip()`` is the token that ends a reply.
"""
import copy
import dataclasses
from typing import List, Optional, Tuple


@dataclasses.dataclass
class Conversation:
    """One conversation laid out in a named chat format."""

    name: str
    system_template: str
    system_message: str
    roles: Tuple[str, str]
    sep: str
    stop_str: Optional[str] = None
    messages: List[list] = dataclasses.field(default_factory=list)

    def set_system_message(self, system_message):
        self.system_message = system_message

    def append_message(self, role, message):
        """Add a turn; ``message=None`` leaves the turn open for the model to fill."""
        self.messages.append([role, message])

    def get_prompt(self):
        parts = [self.system_template.format(system_message=self.system_message) + self.sep]
        for role, message in self.messages:
            parts.append(role if message is None else role + message + self.sep)
        return "".join(parts)

    def stop_strings(self):
        """Strings after which a reply is cut off."""
        stops = [self.sep.strip()]
        if self.stop_str and self.stop_str not in stops:
            stops.append(self.stop_str)
        return stops

    def copy(self):
        return copy.deepcopy(self)


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_DEFAULT_SYSTEM = "You are a tiny test model for offline checks; your answers carry no meaning."

conv_templates = {
    "Hermes-2": Conversation(
        name="Hermes-2",
        system_template="<|im_start|>system\n{system_message}",
        system_message=_DEFAULT_SYSTEM,
        roles=_CHATML_ROLES,
        sep="<|im_end|>",
        stop_str="<|endoftext|>",
    ),
    "internlm2-chat": Conversation(
        name="internlm2-chat",
        system_template="<|im_start|>system\n{system_message}",
        system_message=_DEFAULT_SYSTEM,
        roles=_CHATML_ROLES,
        sep="<|im_end|>",
    ),
    "internvl2_5": Conversation(
        name="internvl2_5",
        system_template="<|im_start|>system\n{system_message}",
        system_message=_DEFAULT_SYSTEM,
        roles=_CHATML_ROLES,
        sep="<|im_end|>\n",
    ),
    "phi3-chat": Conversation(
        name="phi3-chat",
        system_template="<|system|>\n{system_message}",
        system_message=_DEFAULT_SYSTEM,
        roles=("<|user|>\n", "<|assistant|>\n"),
        sep="<|end|>",
    ),
}


def get_conv_template(name):
    """A fresh copy of the template called ``name``."""
    try:
        return conv_templates[name].copy()
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(conv_templates)}") from None
