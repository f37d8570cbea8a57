# The demo's and benchmarks/ablation.py's vanilla recipe: configs/internvl2_tiny_cpu_lora.py (XTuner's InternVL2
# LoRA recipe on the tiny model) with the schedule of configs/vitask_tiny_demo.py: same optimizer steps (its
# stage 1 + stage 2 epochs), batch, data order, lr, warm-up and cosine rule, gradient clipping and LoRA.
from mmengine.config import read_base

with read_base():
    from .internvl2_tiny_cpu_lora import *  # noqa: F401,F403

from xtuner_vitask.engine import WholeIterCosineAnnealingLR, WholeIterLinearLR

max_epochs = 6
lr = 2e-3
warmup_ratio = 0.03
data_seed = 0

train_dataloader.sampler.update(seed=data_seed)  # noqa: F405
optim_wrapper.optimizer.update(lr=lr)  # noqa: F405
param_scheduler = [
    dict(type=WholeIterLinearLR, start_factor=0.01, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=WholeIterCosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg.update(max_epochs=max_epochs)  # noqa: F405
