"""MedMNIST and external image sets -> XTuner InternVL instruction data (the paper's format).

- :mod:`.medmnist`  label names, task types, modality phrases, instruction and response formats
- :mod:`.npz`       locating, downloading, verifying and streaming medmnist's npz files
- :mod:`.convert`   :func:`convert_medmnist` (npz -> images/, {split}.jsonl, meta.json)
- :mod:`.external`  :func:`convert_external` (image folder + CSV -> the same, labels of a meta.json)
- :mod:`.merge`     :func:`merge_sets` (several converted sets -> one with a joint label space)

Importing this package is cheap (numpy, no torch); the converters are imported on first use.
"""
from xtuner_vitask.data.medmnist import (  # noqa: F401
    MEDMNIST_2D_FLAGS, MEDMNIST_SIZES, MODALITY, NO_FINDING, TASK_TYPES, dataset_info,
    format_response, instruction, label_names, parse_response, task_type,
)

__all__ = [
    "MEDMNIST_2D_FLAGS", "MEDMNIST_SIZES", "MODALITY", "NO_FINDING", "TASK_TYPES", "dataset_info",
    "format_response", "instruction", "label_names", "parse_response", "task_type",
    "convert_medmnist", "convert_external", "merge_sets",
]


def __getattr__(name):
    if name == "convert_medmnist":
        from xtuner_vitask.data.convert import convert_medmnist
        return convert_medmnist
    if name == "convert_external":
        from xtuner_vitask.data.external import convert_external
        return convert_external
    if name == "merge_sets":
        from xtuner_vitask.data.merge import merge_sets
        return merge_sets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
