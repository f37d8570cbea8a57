# A tiny TSM for CPU tests and demos: a 2-block ViT (patch 4, 32 px) built by timm with random
# weights (no download), trained in seconds on a small generated set. Point it at data with
#   python -m xtuner.tools.train configs/tsm_tiny_cpu.py --work-dir DIR --cfg-options \
#     train_dataloader.dataset.data_file=D/train.jsonl val_dataloader.dataset.data_file=D/val.jsonl \
#     test_dataloader.dataset.data_file=D/test.jsonl model.meta=D/meta.json
# (class count and task type come from D/meta.json).
from mmengine.config import read_base
from mmengine.optim import CosineAnnealingLR, LinearLR
from mmengine.runner import EpochBasedTrainLoop

with read_base():
    from .tsm._base_tsm_vit import *  # noqa: F401,F403

# Settings
data_root = "data/tiny_tsm/"
img_size = 32
max_epochs = 8
batch_size = 16
lr = 1e-3

model.update(  # noqa: F405
    model_name="vit_tiny_patch16_224",
    pretrained=False,
    img_size=img_size,
    meta=data_root + "meta.json",
    model_kwargs=dict(patch_size=4, depth=2, drop_path_rate=0.0),
)
train_dataloader.update(batch_size=batch_size, num_workers=0)  # noqa: F405
val_dataloader.update(batch_size=batch_size, num_workers=0)  # noqa: F405
test_dataloader.update(batch_size=batch_size, num_workers=0)  # noqa: F405
# no augmentation: a few epochs on a small set should converge the same way every run
train_dataloader.dataset.update(data_file=data_root + "train.jsonl", img_size=img_size, train=False)  # noqa: F405
val_dataloader.dataset.update(data_file=data_root + "val.jsonl", img_size=img_size)  # noqa: F405
test_dataloader.dataset.update(data_file=data_root + "test.jsonl", img_size=img_size)  # noqa: F405

optim_wrapper.optimizer.update(lr=lr, weight_decay=0.01)  # noqa: F405
param_scheduler = [
    dict(type=LinearLR, start_factor=0.1, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(type=EpochBasedTrainLoop, max_epochs=max_epochs, val_interval=1)
default_hooks.logger.update(interval=5)  # noqa: F405
env_cfg.dist_cfg.update(backend="gloo")  # noqa: F405
randomness = dict(seed=0, deterministic=False)
