# VITask on InternVL2-2B for DermaMNIST (224 px), the paper's main setting: 1 epoch per stage.
#   python data_tools/medmnist_to_xtuner.py --flag dermamnist --size 224 --out data/dermamnist_224
#   xtuner train configs/tsm_vit_base_derma.py
#   xtuner train configs/vitask_internvl2_2b_derma.py [--deepspeed deepspeed_zero2]
from mmengine.config import read_base

with read_base():
    from .vitask._base_vitask_internvl2 import *  # noqa: F401,F403
