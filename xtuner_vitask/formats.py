"""The instruction and response formats of the paper's instruction data, and their exact parser.

Response formats (what a record's ``gpt`` turn holds and :func:`parse_response` accepts):

- multi-class / binary: the label name, e.g. ``melanocytic nevi``.
- ordinal (RetinaMNIST): the grade phrase, e.g. ``moderate diabetic retinopathy (grade 2)``.
- multi-label (ChestMNIST): present findings in index order joined by ``", "``, e.g.
  ``effusion, infiltration``; ``no finding`` when none is present.

Parsing is case-insensitive, collapses whitespace and ignores one trailing period; anything else
(an unknown name, findings out of order or repeated) is unparsable and gives ``None``.

Importing this module is cheap (standard library only).
"""
from __future__ import annotations

import re

from xtuner_vitask.contract import MULTI_LABEL, check_task_type
from xtuner_vitask.errors import VITaskError

NO_FINDING = "no finding"
INSTRUCTION_VARIANTS = ("complete", "incomplete")


def instruction(modality: str, label_names, variant: str = "complete") -> str:
    """The paper's instruction; ``variant='incomplete'`` drops the list of diagnoses (paper Fig. 5)."""
    base = f"Analyze the given {modality} image for diagnosis."
    if variant == "complete":
        return f"{base} The possible diagnoses are: {', '.join(label_names)}."
    if variant == "incomplete":
        return base
    raise VITaskError(f"unknown instruction variant {variant!r}: choose {' or '.join(map(repr, INSTRUCTION_VARIANTS))}")


def format_response(task_type: str, label_names, label_indices) -> str:
    """The response text for a record whose labels are ``label_indices`` (see module docstring)."""
    check_task_type(task_type)
    indices = [int(i) for i in label_indices]
    for i in indices:
        if not 0 <= i < len(label_names):
            raise VITaskError(f"label index {i} is outside 0..{len(label_names) - 1}")
    if task_type == MULTI_LABEL:
        if not indices:
            return NO_FINDING
        return ", ".join(label_names[i] for i in sorted(set(indices)))
    if len(indices) != 1:
        raise VITaskError(f"a {task_type} record has exactly one label, got {indices}")
    return label_names[indices[0]]


def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def parse_response(task_type: str, label_names, text: str) -> list[int] | None:
    """Label indices that :func:`format_response` turned into ``text``; ``None`` when unparsable."""
    check_task_type(task_type)
    names = [_normalize(n) for n in label_names]
    answer = _normalize(text)
    if task_type != MULTI_LABEL:
        return [names.index(answer)] if answer in names else None
    if answer == NO_FINDING:
        return []
    answer = re.sub(r"\s*,\s*", ", ", answer)
    return _parse_findings(answer, names, start=0)


def _parse_findings(answer: str, names: list[str], start: int) -> list[int] | None:
    """Split ``answer`` into names with index >= ``start`` joined by ", " (backtracks over commas in names)."""
    for i in range(start, len(names)):
        name = names[i]
        if answer == name:
            return [i]
        if answer.startswith(name + ", "):
            rest = _parse_findings(answer[len(name) + 2:], names, i + 1)
            if rest is not None:
                return [i] + rest
    return None
