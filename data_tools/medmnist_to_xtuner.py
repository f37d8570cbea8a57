"""MedMNIST 2D npz -> XTuner InternVL instruction data (images, JSONL, meta.json).

Thin wrapper: the logic is in ``xtuner_vitask.data``; run ``--help`` for options.
Same as ``xtuner-vitask convert-medmnist``.
"""
import os
import sys

try:
    from xtuner_vitask.cli.convert import script_main
except ImportError:  # run from a source checkout without ``pip install -e .``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xtuner_vitask.cli.convert import script_main

if __name__ == "__main__":
    sys.exit(script_main("convert-medmnist"))
