"""Remote code of the InternVL2-compatible test checkpoints (file names as in OpenGVLab's InternVL2).

These modules are copied verbatim into every checkpoint folder that :mod:`xtuner_vitask.testing` writes,
and transformers loads them from there with ``trust_remote_code=True``. They import each other relatively
(as InternVL2's own files do) and need torch, transformers, timm, einops and sentencepiece only, so a folder
works without this package installed.
"""
