# VITask on InternVL2-2B for bloodmnist (224 px), the paper's setting: 1 epoch per stage.
#   python data_tools/medmnist_to_xtuner.py --flag bloodmnist --size 224 --out data/bloodmnist_224
#   xtuner train configs/tsm_vit_base_blood.py
#   xtuner train configs/vitask_internvl2_2b_blood.py [--deepspeed deepspeed_zero2]
from mmengine.config import read_base

with read_base():
    from .vitask._base_vitask_internvl2 import *  # noqa: F401,F403

data_root = "data/bloodmnist_224/"
tsm_checkpoint = "work_dirs/tsm_vit_base_blood/best_macro_f1_epoch_*.pth"
model.tsm.update(checkpoint=tsm_checkpoint, meta=data_root + "meta.json")  # noqa: F405
train_dataloader.dataset.update(data_paths=data_root + "train.jsonl", tsm_checkpoint=tsm_checkpoint)  # noqa: F405
