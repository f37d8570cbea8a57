# Vanilla XTuner InternVL2 LoRA recipe on the tiny checkpoint, for CPU.
# Build the model and data first:
#   xtuner-vitask make-tiny work_dirs/tiny_internvl2
#   xtuner-vitask demo-data ... (or data_tools/medmnist_to_xtuner.py on a generated npz)
# then: python -m xtuner.tools.train configs/internvl2_tiny_cpu_lora.py --work-dir work_dirs/tiny_vanilla
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.dataset import DefaultSampler
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from peft import LoraConfig
from torch.optim import AdamW
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.engine.runner import TrainLoop

from xtuner_vitask.datasets import InternVL2Dataset
from xtuner_vitask.hooks import VITaskEvalHook
from xtuner_vitask.models import InternVL2

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
path = "work_dirs/tiny_internvl2"
data_root = "data/generated_dermamnist/"
batch_size = 8
seed = 0
# Schedule: the same rule as configs/vitask_tiny_cpu.py (same steps = stage 1 + stage 2 epochs, same data
# order, lr, warm-up and cosine); the demo and benchmarks/ablation.py compare the two recipes this way.
max_epochs = 6
lr = 2e-3
warmup_ratio = 0.03
data_seed = 0

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
model = dict(
    type=InternVL2,
    model_path=path,
    llm=None,  # read (and ignored) by `xtuner convert pth_to_hf`, which expects an `llm` key
    freeze_llm=True,
    freeze_visual_encoder=True,
    freeze_mlp1=True,
    attn_implementation="sdpa",
    torch_dtype="float32",
    activation_checkpointing=False,
    # a random tiny LLM needs its output head trained too to learn label names in a few hundred steps
    llm_lora=dict(type=LoraConfig, r=16, lora_alpha=32, lora_dropout=0.0,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    dataset=dict(type=InternVL2Dataset, model_path=path, data_paths=data_root + "train.jsonl",
                 dynamic_image_size=False, max_length=512),
    sampler=dict(type=DefaultSampler, shuffle=True, seed=data_seed),
    collate_fn=dict(type=default_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=lr, weight_decay=0.0),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type=LinearLR, start_factor=0.01, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=1000, max_keep_ckpts=1, save_last=True),
)
# label-name ranking on val.jsonl beside the training file, at the end (same metric as VITask's hook)
custom_hooks = [dict(type=VITaskEvalHook, interval=1000, max_samples=32, batch_size=16)]
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="gloo"))
visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=seed, deterministic=False)
log_processor = dict(by_epoch=False)
