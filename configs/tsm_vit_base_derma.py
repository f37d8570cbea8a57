# The paper's TSM for DermaMNIST: ViT-B/16 (ImageNet-21k weights by timm name), fully fine-tuned
# on 224 px images. Train: `xtuner train configs/tsm_vit_base_derma.py`.
from mmengine.config import read_base

with read_base():
    from .tsm._base_tsm_vit import *  # noqa: F401,F403

data_root = "data/dermamnist_224/"
model.update(meta=data_root + "meta.json")  # noqa: F405
train_dataloader.dataset.update(data_file=data_root + "train.jsonl")  # noqa: F405
val_dataloader.dataset.update(data_file=data_root + "val.jsonl")  # noqa: F405
test_dataloader.dataset.update(data_file=data_root + "test.jsonl")  # noqa: F405
