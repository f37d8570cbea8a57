# Shared settings of every VITask config (paper sec. 4-5): InternVL2 with its vision encoder and
# mlp1 frozen, LoRA on the LLM, a new exemplar connector for the frozen TSM's CLS feature;
# stage 1 (1 epoch): L_van + L_EP + alpha L_RDA, stage 2 (1 epoch): connector frozen, + beta L_CRT.
#
# Data set configs inherit it with mmengine's `read_base` and change the data and the TSM:
#     with read_base():
#         from .vitask._base_vitask_internvl2 import *
#     data_root = "data/pathmnist_224/"
#     tsm_checkpoint = "work_dirs/tsm_vit_base_path/best_macro_f1_epoch_*.pth"
#     train_dataloader.dataset.update(data_paths=data_root + "train.jsonl", tsm_checkpoint=tsm_checkpoint)
#     model.tsm.update(checkpoint=tsm_checkpoint, meta=data_root + "meta.json")
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.visualization import LocalVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from xtuner.engine.runner import TrainLoop

from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn
from xtuner_vitask.engine import (WholeIterCosineAnnealingLR, WholeIterLinearLR, amp_optim_wrapper,
                                  optimizer_with_param_groups)
from xtuner_vitask.hooks import VITaskEvalHook, VITaskStageHook
from xtuner_vitask.models import VITaskInternVL

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: a local InternVL2 folder or its hub id (huggingface-cli download OpenGVLab/InternVL2-2B)
path = "OpenGVLab/InternVL2-2B"
# "auto": InternVL's own LoRA targets for the checkpoint's LLM (InternLM2: attention.wqkv, attention.wo,
# feed_forward.w1/w2/w3; XTuner's default, None, would also wrap InternLM2's output head); a list names them
lora_targets = "auto"

# Data (written by data_tools) and the TSM trained on it (configs/tsm_vit_base_<set>.py)
data_root = "data/dermamnist_224/"
# the TSM checkpoint (a glob picks the newest match) records its own config and preprocessing
tsm_checkpoint = "work_dirs/tsm_vit_base_derma/best_macro_f1_epoch_*.pth"

# VITask (Table 2 ablation rows are changes of these)
ep_mode = "cls"  # cls | all | rep (paper Fig. 2)
alpha = 1.0  # weight of L_RDA (the paper does not report it)
beta = 1.0  # weight of L_CRT
use_rda = True
use_crt = True
detach_rda = True  # False = RDA*
rda_kl = "reverse"  # eq. 3 as printed, KL(plain || EP); "forward" swaps the sides (a diagnostic)
stage1_epochs = 1
stage2_epochs = 1

# Scheduler & Optimizer
batch_size = 8  # per device
accumulative_counts = 2
dataloader_num_workers = 4
max_epochs = stage1_epochs + stage2_epochs
lr = 1e-4
betas = (0.9, 0.999)
weight_decay = 0.05
max_norm = 1.0
warmup_ratio = 0.03

# Evaluation during training (likelihood ranking over the label names, with and without EP)
eval_interval = 500
eval_max_samples = 512
save_steps = 1000
save_total_limit = 2

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
model = dict(
    type=VITaskInternVL,
    model_path=path,
    llm=None,  # read (and ignored) by `xtuner convert pth_to_hf`, which expects an `llm` key
    freeze_llm=True,
    freeze_visual_encoder=True,
    freeze_mlp1=True,
    # flash-attention 2 where it imports and CUDA runs, else SDPA if the LLM's code has it, else eager
    # (InternVL2-2B's InternLM2 has no SDPA); an explicit choice the LLM cannot do is an error
    attn_implementation="auto",
    torch_dtype="auto",  # bf16 on GPU, fp32 on CPU
    llm_lora=dict(type=LoraConfig, r=128, lora_alpha=256, lora_dropout=0.05, target_modules=lora_targets,
                  task_type="CAUSAL_LM"),
    # config=None rebuilds the TSM from the config stored in its checkpoint (cfg-options included)
    tsm=dict(checkpoint=tsm_checkpoint, config=None, meta=data_root + "meta.json"),
    ep_mode=ep_mode,
    alpha=alpha,
    beta=beta,
    use_rda=use_rda,
    use_crt=use_crt,
    detach_rda=detach_rda,
    rda_kl=rda_kl,
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    # negatives="stage2": CRT negative images are loaded for stage-2 batches only (VITaskStageHook switches them)
    dataset=dict(type=VITaskDataset, model_path=path, data_paths=data_root + "train.jsonl",
                 tsm_checkpoint=tsm_checkpoint, max_length=4096, seed=0, negatives="stage2"),
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=vitask_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# AmpOptimWrapper (bf16) on GPUs; on a machine without one, fp32 OptimWrapper (see xtuner_vitask.engine.optim)
optim_wrapper = dict(
    type=amp_optim_wrapper,
    dtype="bfloat16",
    # the connector in an optimizer group of its own, which stage 2 pins to lr = weight_decay = 0 (VITaskStageHook):
    # under DeepSpeed that is what keeps it frozen; XTuner's --deepspeed keeps this dict
    optimizer=dict(type=optimizer_with_param_groups, optimizer_type=AdamW, lr=lr, betas=betas,
                   weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
)
# epoch fractions round UP to whole iterations: the warmup never becomes 0 iterations on a small set or many GPUs
param_scheduler = [
    dict(type=WholeIterLinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=WholeIterCosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=VITaskStageHook, switch_epoch=stage1_epochs),
    dict(type=VITaskEvalHook, interval=eval_interval, max_samples=eval_max_samples),
]
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, save_optimizer=True, by_epoch=False, interval=save_steps,
                    max_keep_ckpts=save_total_limit, save_last=True),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
# The connector gets no gradient in stage 2: DDP must allow unused parameters.
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=True)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)
