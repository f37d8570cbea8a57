"""MedMNIST and external image sets -> XTuner InternVL instruction data (the paper's format).

- :mod:`.medmnist`  MedMNIST's flags, label names, task types and modality phrases
- :mod:`.npz`       locating, downloading, verifying and streaming medmnist's npz files
- :mod:`.images`    the one image reader (16-bit/float rescaled, grayscale/RGBA/palette handled)
- :mod:`.convert`   :func:`convert_medmnist` (npz -> images/, {split}.jsonl, meta.json)
- :mod:`.external`  :func:`convert_external` (image folder + CSV -> the same, labels of a meta.json)
- :mod:`.merge`     :func:`merge_sets` (several converted sets -> one with a joint label space)
- :mod:`.writer`    the output folder (temporary name, renamed when complete), PNG writing workers

The record and meta.json contract is :mod:`xtuner_vitask.contract`; the instruction and response
formats are :mod:`xtuner_vitask.formats`. Importing this package is cheap (no numpy, no torch);
the converters are imported on first use.
"""
__all__ = ["convert_medmnist", "convert_external", "merge_sets"]


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
