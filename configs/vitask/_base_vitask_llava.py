# Shared settings of the VITask configs on XTuner's LLaVA recipes (InternLM2-chat + CLIP ViT-L/14-336), paper
# sec. 4-5 with the settings of XTuner's LLaVA finetune stage
# (xtuner/configs/llava/internlm2_chat_1_8b_clip_vit_large_p14_336/finetune/*_lora_e1_gpu8_finetune.py):
# the LLM with LoRA (r=512, alpha=256), lr 2e-4, no weight decay, 16 per device, max_length 2048 - 576,
# the projector from XTuner's pretrain stage (pretrained_pth) and TRAINED, as XTuner's finetune stage does
# (LLaVA-1.5's recipe: the projector adapts to the instruction data; it is in every XTuner checkpoint and
# in the export's projector/). Differences from XTuner's recipe, and why:
# - the vision tower is frozen without LoRA (XTuner's finetune adds a LoRA r=64 to it): VITask keeps the
#   vision encoder frozen (paper sec. 5), the TSM brings the task's visual features;
# - the LLM loads in bf16 on GPUs (fp32 on CPU) instead of 4-bit QLoRA: bitsandbytes' 4-bit layers do not
#   run on CPU, where this project's tests train. XTuner's quantization_config can be added to model.llm on
#   GPUs (not tested here);
# - a new exemplar connector for the frozen TSM's CLS feature; stage 1 (1 epoch): L_van + L_EP + alpha L_RDA,
#   stage 2 (1 epoch): connector frozen, + beta L_CRT (VITaskStageHook).
# The same data files as the InternVL2 configs (data_tools' JSONL + meta.json); images are padded to a
# square and CLIP-preprocessed as XTuner's LLaVADataset and `xtuner chat` do.
#
# Export the plain model in XTuner's LLaVA layout and chat with XTuner's own tool:
#   xtuner convert pth_to_hf CONFIG work_dirs/.../iter_N.pth OUT      # OUT/llm_adapter, OUT/projector
#   xtuner chat LLM --llava OUT --visual-encoder CLIP --image IMG --prompt-template internlm2_chat
import torch  # noqa: F401 (configs may name torch dtypes)
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.visualization import LocalVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel
from xtuner.engine.runner import TrainLoop
from xtuner.utils import PROMPT_TEMPLATE

from xtuner_vitask.datasets import vitask_collate_fn
from xtuner_vitask.datasets.llava import VITaskLLaVADataset
from xtuner_vitask.engine import (WholeIterCosineAnnealingLR, WholeIterLinearLR, amp_optim_wrapper,
                                  optimizer_with_param_groups)
from xtuner_vitask.hooks import VITaskStageHook
from xtuner_vitask.models.llava import VITaskLLaVA

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: local folders (huggingface-cli download internlm/internlm2-chat-1_8b --local-dir ...;
# openai/clip-vit-large-patch14-336) and XTuner's pretrain-stage projector (xtuner train
# llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain, or the released xtuner/llava-* weights)
llm_name_or_path = "internlm/internlm2-chat-1_8b"
visual_encoder_name_or_path = "openai/clip-vit-large-patch14-336"
pretrained_pth = "./work_dirs/llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth"
prompt_template = PROMPT_TEMPLATE.internlm2_chat
# "auto": the LLM's attention blocks and MLP (InternLM2: attention.wqkv, attention.wo, feed_forward.w1/w2/w3)
lora_targets = "auto"

# Data (written by data_tools) and the TSM trained on it (configs/tsm_vit_base_<set>.py)
data_root = "data/dermamnist_224/"
tsm_checkpoint = "work_dirs/tsm_vit_base_derma/best_macro_f1_epoch_*.pth"
# tokens per sample WITH its 576 image tokens (XTuner's max_length = 2048 - 576 counts the text before they go in)
max_length = 2048

# VITask (Table 2 ablation rows are changes of these)
ep_mode = "cls"  # cls | all | rep (paper Fig. 2)
alpha = 1.0  # weight of L_RDA
beta = 1.0  # weight of L_CRT
use_rda = True
use_crt = True
detach_rda = True  # False = RDA*
rda_kl = "reverse"  # eq. 3 as printed, KL(plain || EP); "forward" swaps the sides (a diagnostic)
stage1_epochs = 1
stage2_epochs = 1

# Scheduler & Optimizer (XTuner's LLaVA LoRA finetune)
batch_size = 16  # per device
accumulative_counts = 1
dataloader_num_workers = 4
max_epochs = stage1_epochs + stage2_epochs
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1
warmup_ratio = 0.03
save_steps = 500
save_total_limit = 2

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
# tokenizer / image_processor: what `xtuner convert pth_to_hf` reads when it saves a trained LLM or tower
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=llm_name_or_path,
                 trust_remote_code=True, padding_side="right")
image_processor = dict(type=CLIPImageProcessor.from_pretrained,
                       pretrained_model_name_or_path=visual_encoder_name_or_path, trust_remote_code=True)
model = dict(
    type=VITaskLLaVA,
    freeze_llm=True,
    freeze_visual_encoder=True,
    pretrained_pth=pretrained_pth,
    # flash-attention 2 where it imports and CUDA runs, else SDPA if the LLM's code has it, else eager
    attn_implementation="auto",
    torch_dtype="auto",  # bf16 on GPU, fp32 on CPU
    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=llm_name_or_path,
             trust_remote_code=True),
    llm_lora=dict(type=LoraConfig, r=512, lora_alpha=256, lora_dropout=0.05, bias="none",
                  target_modules=lora_targets, task_type="CAUSAL_LM"),
    visual_encoder=dict(type=CLIPVisionModel.from_pretrained,
                        pretrained_model_name_or_path=visual_encoder_name_or_path),
    # config=None rebuilds the TSM from the config stored in its checkpoint
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
    dataset=dict(type=VITaskLLaVADataset, model_path=llm_name_or_path,
                 visual_encoder_path=visual_encoder_name_or_path, template=prompt_template, system="",
                 pad_image_to_square=True, data_paths=data_root + "train.jsonl", tsm_checkpoint=tsm_checkpoint,
                 max_length=max_length, seed=0, negatives="stage2"),
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=vitask_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# AmpOptimWrapper (bf16) on GPUs; fp32 OptimWrapper without one (xtuner_vitask.engine)
optim_wrapper = dict(
    type=amp_optim_wrapper,
    dtype="bfloat16",
    # the connector in an optimizer group of its own, which stage 2 pins to lr = weight_decay = 0 (VITaskStageHook)
    optimizer=dict(type=optimizer_with_param_groups, optimizer_type=AdamW, lr=lr, betas=betas,
                   weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
)
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
# (VITaskEvalHook evaluates InternVL2 models only; evaluate LLaVA exports with XTuner's tools)
custom_hooks = [dict(type=VITaskStageHook, switch_epoch=stage1_epochs)]
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
