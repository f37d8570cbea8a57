"""The shipped InternVL2-2B configs' LR schedules are valid for every data set's real training split,
on 1 GPU and on 8 (the README's command), and the optimizer wrapper has a CPU fallback."""
import glob
import math
import os
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import PARAM_SCHEDULERS

from xtuner_vitask.data.medmnist import dataset_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VITASK_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "vitask_internvl2_2b_*.py")))


def _built(value):
    return value.build() if hasattr(value, "build") else value


def _lr_curve(cfg, iters_per_epoch):
    lr = cfg.optim_wrapper.optimizer.lr
    optim = OptimWrapper(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr))
    schedulers = []
    for scheduler in cfg.param_scheduler:
        scheduler = dict(scheduler, type=_built(scheduler["type"]))
        schedulers.append(PARAM_SCHEDULERS.build(scheduler, default_args=dict(optimizer=optim,
                                                                                epoch_length=iters_per_epoch)))
    curve = []
    for _ in range(cfg.train_cfg.max_epochs * iters_per_epoch):  # mmengine steps iter-based schedulers every iteration
        curve.append(optim.param_groups[0]["lr"])
        for scheduler in schedulers:
            scheduler.step()
    return lr, schedulers, curve


def test_twelve_vitask_configs():
    assert len(VITASK_CONFIGS) == 12


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("path", VITASK_CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_schedule_is_valid_for_the_real_split(path, gpus):
    cfg = Config.fromfile(path)
    flag = re.search(r"data/(\w+mnist)_", cfg.data_root).group(1)
    n_train = dataset_info(flag)["n_samples"]["train"]
    # DefaultSampler gives every rank ceil(N / world) samples; the dataloader keeps the last partial batch
    iters_per_epoch = math.ceil(math.ceil(n_train / gpus) / cfg.train_dataloader.batch_size)
    lr, (warmup, cosine), curve = _lr_curve(cfg, iters_per_epoch)
    assert warmup.begin == 0 and warmup.end >= 2, "a warmup shorter than 2 iterations never reaches the lr"
    assert cosine.begin == warmup.end and cosine.end == len(curve)
    assert curve[0] < 1e-3 * lr  # warmup starts near zero
    assert max(curve) == pytest.approx(lr, rel=1e-6)  # and reaches the configured lr
    assert all(0 < value <= lr * (1 + 1e-9) for value in curve)
    assert curve[-1] < 0.05 * lr or len(curve) < 20  # the cosine decays to (near) zero by the end


def test_breastmnist_on_8_gpus_has_a_warmup():
    """546 images / 8 GPUs / batch 8 = 9 iterations per epoch: int(0.06 * 9) was 0 and mmengine refused to start."""
    cfg = Config.fromfile(os.path.join(REPO, "configs", "vitask_internvl2_2b_breast.py"))
    lr, (warmup, _), curve = _lr_curve(cfg, 9)
    assert warmup.end == 2 and curve[1] == pytest.approx(lr)


def test_amp_optim_wrapper_falls_back_to_fp32_without_gpu():
    from xtuner_vitask.engine import amp_optim_wrapper

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    wrapper = amp_optim_wrapper(dtype="bfloat16", optimizer=optimizer, clip_grad=dict(max_norm=1.0))
    if torch.cuda.is_available():
        assert isinstance(wrapper, AmpOptimWrapper) and wrapper.cast_dtype == torch.bfloat16
    else:
        assert type(wrapper) is OptimWrapper and wrapper.clip_grad_kwargs == dict(max_norm=1.0)
