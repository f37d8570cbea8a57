"""Remote code of the tiny InternVL2-compatible checkpoint.

These modules are copied verbatim into every checkpoint folder that
:func:`xtuner_vitask.testing.build_tiny_internvl` writes, and transformers
loads them from there with ``trust_remote_code=True``. They import each other
relatively (as InternVL2's own files do) and depend on torch and transformers
only, so the folder works without this package installed.
"""
