# VITask on XTuner's LLaVA (InternLM2-chat-1.8B + CLIP ViT-L/14-336) for dermamnist, 1 epoch per stage.
#   python data_tools/medmnist_to_xtuner.py --flag dermamnist --size 224 --out data/dermamnist_224
#   xtuner train configs/tsm_vit_base_derma.py
#   xtuner train configs/vitask_llava_internlm2_chat_1_8b_clip_vit_large_p14_336_derma.py [--deepspeed deepspeed_zero2]
#   xtuner convert pth_to_hf configs/vitask_llava_..._derma.py work_dirs/.../iter_N.pth OUT
#   xtuner chat internlm/internlm2-chat-1_8b --llava OUT --visual-encoder openai/clip-vit-large-patch14-336 \
#       --image IMG --prompt-template internlm2_chat
from mmengine.config import read_base

with read_base():
    from .vitask._base_vitask_llava import *  # noqa: F401,F403

data_root = "data/dermamnist_224/"
tsm_checkpoint = "work_dirs/tsm_vit_base_derma/best_macro_f1_epoch_*.pth"
model.tsm.update(checkpoint=tsm_checkpoint, meta=data_root + "meta.json")  # noqa: F405
train_dataloader.dataset.update(data_paths=data_root + "train.jsonl", tsm_checkpoint=tsm_checkpoint)  # noqa: F405
