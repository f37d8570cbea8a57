# The paper's joint TSM: one ViT-B/16 (ImageNet-21k) over all 12 MedMNIST 2D sets merged by
# data_tools (`merge`), one head over the joint label space (70 classes: OrganA/C/S share their
# 11 organs); each sample's loss only sees its own data set's slice (cross-entropy, or BCE for
# ChestMNIST). The slices are read from the merged set's meta.json when the model is built and
# are stored in the checkpoint, so the trained TSM loads without the data folder.
from mmengine.config import read_base

with read_base():
    from .tsm._base_tsm_vit import *  # noqa: F401,F403

data_root = "data/medmnist_joint_224/"
max_epochs = 5  # the merged training set is large (~500k images at full size)
model.update(meta=data_root + "meta.json")  # noqa: F405
train_dataloader.dataset.update(data_file=data_root + "train.jsonl")  # noqa: F405
val_dataloader.dataset.update(data_file=data_root + "val.jsonl")  # noqa: F405
test_dataloader.dataset.update(data_file=data_root + "test.jsonl")  # noqa: F405
param_scheduler[1].update(end=max_epochs)  # noqa: F405
train_cfg.update(max_epochs=max_epochs)  # noqa: F405
