# The demo's and benchmarks/ablation.py's VITask: configs/vitask_tiny_cpu.py with the fair-protocol schedule.
# configs/internvl2_tiny_demo_lora.py gives XTuner's vanilla recipe the same steps, batch, data order, lr and
# schedule rule (tests/test_demo.py asserts it); the demo passes only data, model, TSM and seed.
from mmengine.config import read_base
from mmengine.optim import OptimWrapper

with read_base():
    from .vitask_tiny_cpu import *  # noqa: F401,F403

stage1_epochs = 5  # the tiny LLM reads the new exemplar token only after a few epochs of the demo's set
stage2_epochs = 1
max_epochs = stage1_epochs + stage2_epochs
lr = 2e-3
warmup_ratio = 0.03  # linear warm-up, then cosine to 0 over both stages: no restart at the switch
connector_lr_mult = 10.0  # the exemplar connector starts from scratch; the LLM only gets LoRA updates
data_seed = 0  # order of the training samples (same in both recipes)

train_dataloader.sampler.update(seed=data_seed)  # noqa: F405
model.update(alpha=1.0, beta=1.0)  # noqa: F405
# the connector in its own optimizer group (stage 2 pins it to lr 0), starting at connector_lr_mult x lr
optim_wrapper = dict(type=OptimWrapper, clip_grad=dict(max_norm=1.0),
                     optimizer=dict(type=optimizer_with_param_groups, optimizer_type=AdamW,  # noqa: F405
                                    lr=lr, weight_decay=0.0, lr_mult={"connector": connector_lr_mult}))
param_scheduler = [
    dict(type=WholeIterLinearLR, start_factor=0.01, by_epoch=True, begin=0,  # noqa: F405
         end=warmup_ratio * max_epochs, convert_to_iter_based=True),
    dict(type=WholeIterCosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs,  # noqa: F405
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg.update(max_epochs=max_epochs)  # noqa: F405
custom_hooks = [
    dict(type=VITaskStageHook, switch_epoch=stage1_epochs),  # noqa: F405
    dict(type=VITaskEvalHook, interval=1000, max_samples=32, batch_size=16),  # noqa: F405
]
