"""DeepSpeed ZeRO-3 on CPU processes (gloo): gathered parameters must be complete before they are used.

ZeRO-3 loads a checkpoint by gathering each module's partitioned parameters, letting rank 0 copy the
file's values in, broadcasting them and partitioning again (transformers' ``from_pretrained`` under
``zero.Init``). DeepSpeed 0.16.2 gathers several parameters with one async all-gather each and then
waits for the last one only ("ensures the operation is enqueued"): right for CUDA, where the collectives
run in order on one stream and the accelerator is synchronised afterwards, wrong on its CPU accelerator,
where gloo runs async collectives on a pool of threads and the CPU accelerator skips that synchronisation.
Measured on 2 gloo ranks loading the tiny InternVL2: 7 of 50 gathers still in flight when DeepSpeed used
their result, and a rank whose partition of a frozen base tensor held garbage after loading (up to
2.7e36; non-finite in other runs), so training died with a non-finite loss at step 1.

The fix is the missing wait: on DeepSpeed's CPU accelerator, async all-gathers complete before they
return. Nothing changes on GPUs.
"""
import functools

_COMPLETES = "_vitask_completes_before_return"


def make_cpu_all_gathers_complete():
    """With ZeRO-3 on DeepSpeed's CPU accelerator, wait for every async all-gather as it is issued.

    Idempotent; returns whether the waits are in place (False on GPUs, without ZeRO-3 or DeepSpeed).
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return False
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    for name in ("all_gather", "all_gather_into_tensor"):
        issue = getattr(dist, name)
        if getattr(issue, _COMPLETES, False):
            continue

        @functools.wraps(issue)
        def issue_and_complete(*args, _issue=issue, **kwargs):
            work = _issue(*args, **kwargs)
            if kwargs.get("async_op") and work is not None:
                work.wait()
            return work

        setattr(issue_and_complete, _COMPLETES, True)
        setattr(dist, name, issue_and_complete)
    return True
