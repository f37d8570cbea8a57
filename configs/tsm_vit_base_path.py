# TSM for pathmnist (9 classes, multi-class: cross-entropy); everything else as the paper's ViT-B/16 base.
from mmengine.config import read_base

with read_base():
    from .tsm._base_tsm_vit import *  # noqa: F401,F403

data_root = "data/pathmnist_224/"
model.update(meta=data_root + "meta.json")  # noqa: F405
train_dataloader.dataset.update(data_file=data_root + "train.jsonl")  # noqa: F405
val_dataloader.dataset.update(data_file=data_root + "val.jsonl")  # noqa: F405
test_dataloader.dataset.update(data_file=data_root + "test.jsonl")  # noqa: F405
