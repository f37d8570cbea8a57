# VITask on XTuner's LLaVA (InternLM2-chat-7B + CLIP ViT-L/14-336) for dermamnist, 1 epoch per stage; the
# settings of XTuner's llava_internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune (LoRA r=512,
# lr 2e-4, 16 per device) as in the 1.8B config (see configs/vitask/_base_vitask_llava.py for the differences).
#   xtuner train configs/vitask_llava_internlm2_chat_7b_clip_vit_large_p14_336_derma.py --deepspeed deepspeed_zero2
#   xtuner convert pth_to_hf configs/vitask_llava_internlm2_chat_7b_..._derma.py work_dirs/.../iter_N.pth OUT
#   xtuner chat internlm/internlm2-chat-7b --llava OUT --visual-encoder openai/clip-vit-large-patch14-336 \
#       --image IMG --prompt-template internlm2_chat
from mmengine.config import read_base

with read_base():
    from .vitask._base_vitask_llava import *  # noqa: F401,F403

llm_name_or_path = "internlm/internlm2-chat-7b"
pretrained_pth = "./work_dirs/llava_internlm2_chat_7b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth"
data_root = "data/dermamnist_224/"
tsm_checkpoint = "work_dirs/tsm_vit_base_derma/best_macro_f1_epoch_*.pth"

tokenizer.update(pretrained_model_name_or_path=llm_name_or_path)  # noqa: F405
model.update(pretrained_pth=pretrained_pth)  # noqa: F405
model.llm.update(pretrained_model_name_or_path=llm_name_or_path)  # noqa: F405
model.tsm.update(checkpoint=tsm_checkpoint, meta=data_root + "meta.json")  # noqa: F405
train_dataloader.dataset.update(model_path=llm_name_or_path, data_paths=data_root + "train.jsonl",  # noqa: F405
                                tsm_checkpoint=tsm_checkpoint)
