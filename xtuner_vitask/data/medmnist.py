"""MedMNIST 2D data sets as the paper phrases them: label names, task types, modalities.

Everything about a data set (label names, task, channels, split sizes, URLs, MD5) comes from
``medmnist.INFO``; this module only adds what the paper adds on top: readable label names and a
modality phrase per set. The instruction and response formats are in :mod:`xtuner_vitask.formats`.
"""
from __future__ import annotations

import importlib.util
import re

from xtuner_vitask.contract import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL
from xtuner_vitask.errors import VITaskError

# The 12 MedMNIST 2D classification sets of the paper, in medmnist's order.
MEDMNIST_2D_FLAGS = (
    "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
    "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
)

# Image sizes medmnist publishes for 2D sets (28 px has no suffix in the file name).
MEDMNIST_SIZES = (28, 64, 128, 224)

# The imaging modality, as it reads in "Analyze the given {modality} image for diagnosis."
MODALITY = {
    "pathmnist": "colon pathology",
    "chestmnist": "chest X-ray",
    "dermamnist": "dermatoscope",
    "octmnist": "retinal OCT",
    "pneumoniamnist": "chest X-ray",
    "retinamnist": "fundus",
    "breastmnist": "breast ultrasound",
    "bloodmnist": "blood cell microscope",
    "tissuemnist": "kidney cortex microscope",
    "organamnist": "abdominal CT",
    "organcmnist": "abdominal CT",
    "organsmnist": "abdominal CT",
}

# medmnist's task strings -> the contract's task types.
_TASK_TYPE_OF_MEDMNIST_TASK = {
    "multi-class": MULTI_CLASS,
    "binary-class": BINARY,
    "multi-label, binary-class": MULTI_LABEL,
    "ordinal-regression": ORDINAL,
}

# Where medmnist's label is terse, the readable phrase (the meaning is medmnist's own).
_READABLE_LABEL = {
    ("chestmnist", "pleural"): "pleural thickening",  # NIH ChestX-ray14 "Pleural_Thickening"
    # RetinaMNIST grades are the diabetic retinopathy severity scale (DeepDRiD).
    ("retinamnist", "0"): "no diabetic retinopathy (grade 0)",
    ("retinamnist", "1"): "mild diabetic retinopathy (grade 1)",
    ("retinamnist", "2"): "moderate diabetic retinopathy (grade 2)",
    ("retinamnist", "3"): "severe diabetic retinopathy (grade 3)",
    ("retinamnist", "4"): "proliferative diabetic retinopathy (grade 4)",
}

_info_cache = None


def medmnist_info_module():
    """``medmnist.info`` (INFO, DEFAULT_ROOT, HOMEPAGE) without importing torch.

    ``import medmnist`` imports its torch Dataset classes (~5 s); ``medmnist/info.py`` itself is
    plain data, so it is loaded from the installed package's own file when the package is not
    already imported.
    """
    global _info_cache
    if _info_cache is None:
        import sys

        if "medmnist.info" in sys.modules:
            _info_cache = sys.modules["medmnist.info"]
        else:
            spec = importlib.util.find_spec("medmnist")
            if spec is None or not spec.submodule_search_locations:
                raise VITaskError("the 'medmnist' package is not installed: pip install medmnist")
            import os

            path = os.path.join(list(spec.submodule_search_locations)[0], "info.py")
            info_spec = importlib.util.spec_from_file_location("_vitask_medmnist_info", path)
            module = importlib.util.module_from_spec(info_spec)
            info_spec.loader.exec_module(module)
            _info_cache = module
    return _info_cache


def check_flag(flag: str) -> str:
    """Return ``flag`` if it names one of the 12 2D sets, else raise VITaskError listing them."""
    if flag not in MEDMNIST_2D_FLAGS:
        raise VITaskError(
            f"unknown MedMNIST 2D data set {flag!r}: choose one of {', '.join(MEDMNIST_2D_FLAGS)}"
        )
    return flag


def check_size(size) -> int:
    """Return ``size`` if medmnist publishes 2D images of that size, else raise VITaskError."""
    if size not in MEDMNIST_SIZES:
        raise VITaskError(
            f"unsupported MedMNIST image size {size!r}: choose one of "
            f"{', '.join(map(str, MEDMNIST_SIZES))}"
        )
    return int(size)


def dataset_info(flag: str) -> dict:
    """``medmnist.INFO[flag]`` for one of the 12 2D sets (VITaskError for any other name)."""
    check_flag(flag)
    return medmnist_info_module().INFO[flag]


def _readable(flag: str, raw: str) -> str:
    if (flag, raw) in _READABLE_LABEL:
        return _READABLE_LABEL[(flag, raw)]
    name = raw.strip().lower()
    name = re.sub(r"(\w)\(", r"\1 (", name)  # "granulocytes(myelocytes" -> "granulocytes (myelocytes"
    name = re.sub(r"^(\w+)-(left|right)$", r"\2 \1", name)  # "kidney-left" -> "left kidney"
    return re.sub(r"\s+", " ", name)


def label_names(flag: str) -> list[str]:
    """Readable lowercase label names of ``flag`` in index order (from ``medmnist.INFO[flag]['label']``)."""
    labels = dataset_info(flag)["label"]
    return [_readable(flag, labels[str(i)]) for i in range(len(labels))]


def task_type(flag: str) -> str:
    """The contract's task type of ``flag`` (one of ``contract.TASK_TYPES``), from ``medmnist.INFO[flag]['task']``."""
    return _TASK_TYPE_OF_MEDMNIST_TASK[dataset_info(flag)["task"]]
