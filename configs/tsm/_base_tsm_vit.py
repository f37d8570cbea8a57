# Shared settings of every TSM config: a timm ViT fully fine-tuned as a classifier on one
# contract data set (JSONL + images + meta.json written by data_tools), validated each epoch
# (accuracy, macro-F1, AUC), the best checkpoint by macro-F1 kept.
#
# Data set configs inherit it with mmengine's `read_base` and change the data and the head:
#     with read_base():
#         from .tsm._base_tsm_vit import *
#     data_root = "data/pathmnist_224/"
#     model.update(meta=data_root + "meta.json")   # class count and task type come from the data
#     train_dataloader.dataset.update(data_file=data_root + "train.jsonl")   # and val / test
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from mmengine.runner import EpochBasedTrainLoop, TestLoop, ValLoop
from mmengine.visualization import LocalVisBackend, Visualizer
from torch.optim import AdamW

from xtuner_vitask.tsm.dataset import ImageClassificationDataset
from xtuner_vitask.tsm.metric import ClassificationMetric
from xtuner_vitask.tsm.model import TaskSpecificModel

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: the paper's TSM, ViT-B/16 pre-trained on ImageNet-21k (timm name; the weights come from
# timm's hub cache, or pass checkpoint="/path/to/weights" and pretrained=False offline).
model_name = "vit_base_patch16_224.augreg_in21k"
pretrained = True
img_size = 224
# Pixel normalization of that checkpoint (timm pretrained_cfg); the same values go to the
# datasets below and are recorded in the TSM, which the exemplar cache and VITask reuse.
mean = (0.5, 0.5, 0.5)
std = (0.5, 0.5, 0.5)

# Data (a folder written by data_tools: train/val/test.jsonl + meta.json + images). The head's class
# count and loss (cross-entropy for multi-class | binary | ordinal, BCE for multi-label, per-task
# slices for a merged multi-task set) come from its meta.json.
data_root = "data/dermamnist_224/"

# Scheduler & Optimizer (full fine-tune)
batch_size = 64
dataloader_num_workers = 4
max_epochs = 10
lr = 1e-4
betas = (0.9, 0.999)
weight_decay = 0.05
max_norm = 1.0  # grad clip
warmup_ratio = 0.1
# fp32 everywhere; on a GPU, `--cfg-options optim_wrapper.type=AmpOptimWrapper
# optim_wrapper.dtype=bfloat16` trains faster (AmpOptimWrapper asserts a GPU).

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
model = dict(
    type=TaskSpecificModel,
    model_name=model_name,
    meta=data_root + "meta.json",
    img_size=img_size,
    pretrained=pretrained,
    mean=mean,
    std=std,
    model_kwargs=dict(drop_path_rate=0.1),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    persistent_workers=False,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type="tsm_collate"),
    dataset=dict(type=ImageClassificationDataset, data_file=data_root + "train.jsonl",
                 img_size=img_size, mean=mean, std=std, train=True),
)
val_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    persistent_workers=False,
    sampler=dict(type=DefaultSampler, shuffle=False),
    collate_fn=dict(type="tsm_collate"),
    dataset=dict(type=ImageClassificationDataset, data_file=data_root + "val.jsonl",
                 img_size=img_size, mean=mean, std=std, train=False),
)
test_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    persistent_workers=False,
    sampler=dict(type=DefaultSampler, shuffle=False),
    collate_fn=dict(type="tsm_collate"),
    dataset=dict(type=ImageClassificationDataset, data_file=data_root + "test.jsonl",
                 img_size=img_size, mean=mean, std=std, train=False),
)
val_evaluator = dict(type=ClassificationMetric)
test_evaluator = dict(type=ClassificationMetric)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm),
)
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-3, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(type=EpochBasedTrainLoop, max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type=ValLoop)
test_cfg = dict(type=TestLoop)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, interval=20),
    param_scheduler=dict(type=ParamSchedulerHook),
    # keep the last epoch (for --resume) and the best epoch by validation macro-F1
    checkpoint=dict(type=CheckpointHook, by_epoch=True, interval=1, max_keep_ckpts=1,
                    save_best="macro_f1", rule="greater"),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_processor = dict(by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
