"""ZeRO-3 on DeepSpeed's CPU accelerator: how many all-gathers are still in flight when a model load uses them.

Loads a tiny InternVL2 (built here) with ``AutoModel.from_pretrained`` under a ZeRO-3 config on 2 gloo ranks,
once as DeepSpeed 0.16.2 does it and once with the plugin's wait (``xtuner_vitask.models.zero3_cpu``), and
counts the all-gathers of ``Init._allgather_params_coalesced`` that had not completed when it returned (it
waits for the last one only), plus the loaded tensors that differ from the file on either rank.

    python benchmarks/zero3_cpu_gathers.py          # runs itself under torchrun twice
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(model_dir, fix):
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from deepspeed.runtime.zero import partition_parameters
    from safetensors.torch import load_file
    from transformers import AutoModel
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    issued, counts = [], dict(gathers=0, in_flight=0)
    issue = dist.all_gather_into_tensor

    def recording(*args, **kwargs):
        work = issue(*args, **kwargs)
        if kwargs.get("async_op"):
            issued.append(work)
        return work

    dist.all_gather_into_tensor = recording
    coalesced = partition_parameters.Init._allgather_params_coalesced

    def counting(self, params, *args, **kwargs):
        issued.clear()
        result = coalesced(self, params, *args, **kwargs)
        counts["gathers"] += len(issued)
        counts["in_flight"] += sum(not work.is_completed() for work in issued)
        return result

    partition_parameters.Init._allgather_params_coalesced = counting
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # noqa: F841
    if fix:
        from xtuner_vitask.models.zero3_cpu import make_cpu_all_gathers_complete

        make_cpu_all_gathers_complete()
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=torch.float32)
    reference = load_file(os.path.join(model_dir, "model.safetensors"))
    wrong = 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # one at a time: a single gather is waited for
            wrong += int(name in reference and not torch.equal(param, reference[name]))
    print(f"rank {dist.get_rank()} {'with the wait' if fix else 'DeepSpeed 0.16.2'}: {counts['in_flight']} of "
          f"{counts['gathers']} gathers in flight when used; {wrong} loaded tensors differ from the file", flush=True)


def main():
    from xtuner_vitask.testing import build_tiny_internvl

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_internvl(Path(tmp) / "tiny", llm="qwen2"))
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        for fix in ("0", "1"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29671",
                            __file__, "--worker", model_dir, fix], env=env, check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3] == "1")
    else:
        main()
