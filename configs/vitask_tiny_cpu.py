# VITask on the tiny InternVL2 (xtuner-vitask make-tiny) with the tiny TSM, both stages on CPU in
# seconds. Tests and the demo run it with --cfg-options pointing at their own folders:
#   python -m xtuner.tools.train configs/vitask_tiny_cpu.py --work-dir DIR --cfg-options \
#     model.model_path=TINY train_dataloader.dataset.model_path=TINY \
#     train_dataloader.dataset.data_paths=D/train.jsonl model.tsm.meta=D/meta.json \
#     model.tsm.checkpoint=TSM.pth train_dataloader.dataset.tsm_checkpoint=TSM.pth
from mmengine.config import read_base
from mmengine.optim import ConstantLR, OptimWrapper

with read_base():
    from .vitask._base_vitask_internvl2 import *  # noqa: F401,F403

path = "work_dirs/tiny_internvl2"
data_root = "data/tiny/"
tsm_checkpoint = "work_dirs/tsm_tiny_cpu/best_macro_f1_epoch_*.pth"
lora_targets = "auto"  # InternVL's own LoRA targets for the checkpoint's LLM (InternLM2: attention.wqkv, ...)

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

optim_wrapper = dict(type=OptimWrapper, clip_grad=dict(max_norm=1.0),
                     optimizer=dict(type=optimizer_with_param_groups, optimizer_type=AdamW,  # noqa: F405
                                    lr=2e-3, weight_decay=0.0))
param_scheduler = [dict(type=ConstantLR, factor=1.0, by_epoch=False, begin=0)]
custom_hooks = [
    dict(type=VITaskStageHook, switch_epoch=1),  # noqa: F405
    dict(type=VITaskEvalHook, interval=1000, max_samples=32, batch_size=16),  # noqa: F405
]
default_hooks.logger.update(interval=1)  # noqa: F405
log_processor = dict(by_epoch=False, window_size=1)  # log every step unsmoothed (tests compare them)
default_hooks.checkpoint.update(interval=1000, max_keep_ckpts=1)  # noqa: F405
env_cfg.dist_cfg.update(backend="gloo")  # noqa: F405
