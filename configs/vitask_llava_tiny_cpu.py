# VITask on the tiny LLaVA (xtuner_vitask.testing.build_tiny_llava) with the tiny TSM, both stages on CPU in
# seconds. Tests run it with --cfg-options pointing at their own folders:
#   python -m xtuner.tools.train configs/vitask_llava_tiny_cpu.py --work-dir DIR --cfg-options \
#     model.llm.pretrained_model_name_or_path=T/llm \
#     model.visual_encoder.pretrained_model_name_or_path=T/visual_encoder \
#     model.pretrained_pth=T/projector_pretrain.pth train_dataloader.dataset.model_path=T/llm \
#     train_dataloader.dataset.visual_encoder_path=T/visual_encoder train_dataloader.dataset.data_paths=D/train.jsonl \
#     model.tsm.meta=D/meta.json model.tsm.checkpoint=TSM.pth train_dataloader.dataset.tsm_checkpoint=TSM.pth
from mmengine.config import read_base
from mmengine.optim import ConstantLR, OptimWrapper

with read_base():
    from .vitask._base_vitask_llava import *  # noqa: F401,F403

tiny = "work_dirs/tiny_llava/"
data_root = "data/tiny/"
tsm_checkpoint = "work_dirs/tsm_tiny_cpu/best_macro_f1_epoch_*.pth"

tokenizer.update(pretrained_model_name_or_path=tiny + "llm")  # noqa: F405
image_processor.update(pretrained_model_name_or_path=tiny + "visual_encoder")  # noqa: F405
model.update(  # noqa: F405
    pretrained_pth=tiny + "projector_pretrain.pth",
    torch_dtype="float32",
    activation_checkpointing=False,
    tsm=dict(checkpoint=tsm_checkpoint, config=None, meta=data_root + "meta.json"),
)
model.llm.update(pretrained_model_name_or_path=tiny + "llm")  # noqa: F405
model.visual_encoder.update(pretrained_model_name_or_path=tiny + "visual_encoder")  # noqa: F405
# a random tiny LLM needs its output head trained too to learn label names in a few steps
model.llm_lora.update(r=16, lora_alpha=32, lora_dropout=0.0, modules_to_save="auto")  # noqa: F405
train_dataloader.update(batch_size=8, num_workers=0)  # noqa: F405
train_dataloader.dataset.update(model_path=tiny + "llm", visual_encoder_path=tiny + "visual_encoder",  # noqa: F405
                                data_paths=data_root + "train.jsonl", tsm_checkpoint=tsm_checkpoint, max_length=512)

optim_wrapper = dict(type=OptimWrapper, clip_grad=dict(max_norm=1.0),
                     optimizer=dict(type=optimizer_with_param_groups, optimizer_type=AdamW,  # noqa: F405
                                    lr=2e-3, weight_decay=0.0))
param_scheduler = [dict(type=ConstantLR, factor=1.0, by_epoch=False, begin=0)]
default_hooks.logger.update(interval=1)  # noqa: F405
log_processor = dict(by_epoch=False, window_size=1)  # log every step unsmoothed (tests compare them)
default_hooks.checkpoint.update(interval=1000, max_keep_ckpts=1)  # noqa: F405
env_cfg.dist_cfg.update(backend="gloo")  # noqa: F405
