# VITask on the tiny InternVL2 (xtuner-vitask make-tiny) with the tiny TSM, both stages on CPU in
# seconds. Tests and the demo run it with --cfg-options pointing at their own folders:
#   python -m xtuner.tools.train configs/vitask_tiny_cpu.py --work-dir DIR --cfg-options \
#     model.model_path=TINY train_dataloader.dataset.model_path=TINY \
#     train_dataloader.dataset.data_paths=D/train.jsonl model.tsm.meta=D/meta.json \
#     model.tsm.checkpoint=TSM.pth train_dataloader.dataset.tsm_checkpoint=TSM.pth
from mmengine.config import read_base
from mmengine.optim import OptimWrapper

with read_base():
    from .vitask._base_vitask_internvl2 import *  # noqa: F401,F403

path = "work_dirs/tiny_internvl2"
data_root = "data/tiny/"
tsm_checkpoint = "work_dirs/tsm_tiny_cpu/best_macro_f1_epoch_*.pth"
lora_targets = "auto"  # InternVL's own LoRA targets for the checkpoint's LLM (InternLM2: attention.wqkv, ...)

# Schedule: the demo and benchmarks/ablation.py use exactly this. The vanilla recipe
# (configs/internvl2_tiny_cpu_lora.py) has the same steps, data order, lr and schedule rule.
stage1_epochs = 5  # the tiny LLM reads the new exemplar token only after a few epochs of this size
stage2_epochs = 1
max_epochs = stage1_epochs + stage2_epochs
lr = 2e-3
warmup_ratio = 0.03  # linear warm-up, then cosine to 0 over both stages: no restart at the switch
connector_lr_mult = 10.0  # the exemplar connector starts from scratch; the LLM only gets LoRA updates
data_seed = 0  # order of the training samples (same in both recipes)

model.update(  # noqa: F405
    model_path=path,
    attn_implementation="auto",  # eager for InternLM2 (no SDPA in its code), SDPA for Qwen2/Phi3/Llama
    torch_dtype="float32",
    activation_checkpointing=False,
    tsm=dict(checkpoint=tsm_checkpoint, config=None,
             meta=data_root + "meta.json"),
)
# a random tiny LLM needs its output head trained too to learn label names in a few hundred steps;
# "auto" is the LLM's own head (InternLM2: `output`, the others: `lm_head`)
model.llm_lora.update(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_targets,  # noqa: F405
                      modules_to_save="auto")
train_dataloader.update(batch_size=8, num_workers=0)  # noqa: F405
train_dataloader.dataset.update(model_path=path, data_paths=data_root + "train.jsonl", tsm_checkpoint=tsm_checkpoint,  # noqa: F405
                                max_length=512)

train_dataloader.sampler.update(seed=data_seed)  # noqa: F405
model.update(alpha=1.0, beta=1.0)  # noqa: F405

# the connector in its own optimizer group (stage 2 pins it to lr 0), starting at connector_lr_mult x lr
optim_wrapper = dict(type=OptimWrapper, clip_grad=dict(max_norm=1.0),
                     optimizer=dict(type=optimizer_with_param_groups, optimizer_type=AdamW,  # noqa: F405
                                    lr=lr, weight_decay=0.0, lr_mult={"connector": connector_lr_mult}))
param_scheduler = [
    dict(type=WholeIterLinearLR, start_factor=0.01, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=WholeIterCosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg.update(max_epochs=max_epochs)  # noqa: F405
custom_hooks = [
    dict(type=VITaskStageHook, switch_epoch=stage1_epochs),  # noqa: F405
    dict(type=VITaskEvalHook, interval=1000, max_samples=32, batch_size=16),  # noqa: F405
]
default_hooks.logger.update(interval=1)  # noqa: F405
log_processor = dict(by_epoch=False, window_size=1)  # log every step unsmoothed (tests compare them)
default_hooks.checkpoint.update(interval=1000, max_keep_ckpts=1)  # noqa: F405
env_cfg.dist_cfg.update(backend="gloo")  # noqa: F405
