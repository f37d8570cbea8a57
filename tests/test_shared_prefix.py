"""Shared prefix (models/shared_prefix.py): the same losses and gradients as full passes, less LLM work.

One model, one batch: ``shared_prefix=False`` (full passes, the reference) and ``True`` are run in turn and
compared to 1e-5 (fp32) -- every term of eq. 7 and the gradient of every trainable tensor (LoRA, connector) --
on InternVL2's InternLM2 (remote code: eager attention, legacy tuple caches, its own reentrant checkpointing)
and on a transformers Qwen2 (SDPA, Cache objects)."""

import pytest
import torch
from peft import LoraConfig

from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn
from xtuner_vitask.models import VITaskInternVL
from xtuner_vitask.models import shared_prefix
from xtuner_vitask.models.losses import IGNORE_INDEX

TOL = dict(rtol=1e-5, atol=1e-5)
EXEMPLAR_DIM = 16
LORA_TARGETS = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                "internlm2": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2"]}
ATTENTION = {"qwen2": "sdpa", "internlm2": "eager"}  # InternLM2's remote code has no SDPA


@pytest.fixture(scope="module", params=["internlm2", "qwen2"])
def llm(request, tiny_model, tiny_model_qwen2, derma_data):
    """(flavour, model folder, collated batch of 6 samples) for each LLM flavour."""
    path = tiny_model if request.param == "internlm2" else tiny_model_qwen2  # conftest: tiny_model is InternLM2
    ds = VITaskDataset(path, f"{derma_data}/train.jsonl", tsm_img_size=32, max_length=512)
    samples = [ds[i] for i in range(6)]
    return request.param, path, samples


def build(model_path, llm="internlm2", checkpointing=False, **kw):
    torch.manual_seed(0)
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[llm],
                task_type="CAUSAL_LM")
    model = VITaskInternVL(model_path, freeze_llm=True, attn_implementation=ATTENTION[llm], torch_dtype="float32",
                           activation_checkpointing=checkpointing, llm_lora=lora, exemplar_dim=EXEMPLAR_DIM, **kw)
    # LoRA starts with B = 0 (A's gradient would be 0): random values make every path carry gradient
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def with_exemplars(data, ep_mode, seed=2):
    g = torch.Generator().manual_seed(seed)
    n = data["input_ids"].shape[0]
    shape = (n, EXEMPLAR_DIM) if ep_mode == "cls" else (n, 5, EXEMPLAR_DIM)
    return dict(data, exemplars=torch.randn(shape, generator=g))


@pytest.fixture(scope="module")
def batch(tiny_model, derma_data):
    """A Qwen2 batch for the tests that are not about the LLM flavour."""
    ds = VITaskDataset(tiny_model, f"{derma_data}/train.jsonl", tsm_img_size=32, max_length=512)
    return vitask_collate_fn([ds[i] for i in range(6)])["data"]


def step(model, data, shared):
    """Terms and gradients of one forward + backward of eq. 7, and the tokens the LLM decoder processed."""
    model.shared_prefix = shared
    model.zero_grad(set_to_none=True)
    decoder, _ = model.decoder_and_head()
    tokens = []
    handle = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["inputs_embeds"].shape[:2].numel()), with_kwargs=True)
    try:
        terms = model(data)
    finally:
        handle.remove()
    total, _ = model.parse_losses(terms)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads, sum(tokens)


def assert_same(model, data):
    ref_terms, ref_grads, ref_tokens = step(model, data, shared=False)
    terms, grads, tokens = step(model, data, shared=True)
    assert list(terms) == list(ref_terms)
    for name in ref_terms:
        torch.testing.assert_close(terms[name], ref_terms[name], **TOL, msg=name)
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    return tokens, ref_tokens


def expected_tokens(model, data, stage, use_crt=True):
    """LLM tokens of the shared layout: trunk once, each suffix, and the negative from the root."""
    input_ids, width = data["input_ids"], data["input_ids"].shape[1]
    spans = model.exemplar_spans(input_ids)
    root_end, trunk_end = shared_prefix.layout(input_ids, spans, data["labels"], model.model.img_context_token_id)
    b = input_ids.shape[0]
    k = {"cls": 1, "all": 5, "rep": 5}[model.ep_mode]
    ep_width = max(int(n) - (s1 - s0) + k for n, (s0, s1) in zip(data["attention_mask"].sum(1), spans))
    n = b * trunk_end + b * (width - trunk_end) + b * (ep_width - trunk_end)
    if stage == 2 and use_crt:
        n += b * (width - root_end)
    return n


@pytest.mark.parametrize("ep_mode", ["cls", "all", "rep"])
@pytest.mark.parametrize("stage,use_crt", [(1, True), (2, True), (2, False)])
def test_shared_prefix_equals_full_passes(llm, ep_mode, stage, use_crt):
    flavour, path, samples = llm
    model = build(path, flavour, ep_mode=ep_mode, use_crt=use_crt)
    model.set_stage(stage)
    data = with_exemplars(vitask_collate_fn(samples)["data"], ep_mode)
    tokens, ref_tokens = assert_same(model, data)
    assert tokens == expected_tokens(model, data, stage, use_crt) < ref_tokens


@pytest.mark.parametrize("ep_mode,stage", [("cls", 2), ("all", 1)])
def test_with_activation_checkpointing(llm, ep_mode, stage):
    flavour, path, samples = llm
    model = build(path, flavour, checkpointing=True, ep_mode=ep_mode)
    model.set_stage(stage)
    decoder, _ = model.decoder_and_head()
    assert decoder.gradient_checkpointing
    assert_same(model, with_exemplars(vitask_collate_fn(samples)["data"], ep_mode))
    # the decoder's own checkpointing and its layers are as they were
    assert decoder.gradient_checkpointing and all("forward" not in layer.__dict__ for layer in decoder.layers)


def test_rda_star_and_no_rda(tiny_model, batch):
    """RDA* couples EP to the plain pass (one backward for both); without RDA, EP is independent; the forward-KL
    diagnostic takes the same passes."""
    data = with_exemplars(batch, "cls")
    for kw in (dict(detach_rda=False), dict(use_rda=False), dict(rda_kl="forward")):
        model = build(tiny_model, **kw)
        model.set_stage(2)
        assert_same(model, data)


def _shift_image(samples, i, extra):
    """Sample i with ``extra`` more text tokens before its image (another system text length)."""
    sample = dict(samples[i])
    ids, labels = list(sample["input_ids"]), list(sample["labels"])
    sample["input_ids"] = ids[:2] + ids[2:2 + extra] + ids[2:]
    sample["labels"] = labels[:2] + [IGNORE_INDEX] * extra + labels[2:]
    return sample


def test_samples_whose_images_start_at_different_positions(llm):
    """The shared part is what every sample shares: the rest of a longer prefix runs in its suffixes."""
    flavour, path, samples = llm
    items = [_shift_image(samples, 0, 3), samples[1], _shift_image(samples, 2, 1), *samples[3:]]
    data = vitask_collate_fn(items)["data"]
    model = build(path, flavour)
    spans = model.exemplar_spans(data["input_ids"])
    assert len({a for a, _ in spans}) == 3
    for stage in (1, 2):
        model.set_stage(stage)
        assert_same(model, with_exemplars(data, "cls"))


def test_each_parameter_accumulates_its_gradient_once_per_step(tiny_model, batch):
    """The EP gradient rides on loss_ep into the step's one backward: the hooks DeepSpeed's ZeRO and DDP's
    reducer put on the gradient accumulators fire once per parameter, as with full passes."""
    model = build(tiny_model)
    model.set_stage(2)
    params = [p for p in model.parameters() if p.requires_grad]
    fired = [0] * len(params)
    keep = []  # the accumulator nodes must outlive the loop (as DeepSpeed keeps them)
    for n, p in enumerate(params):
        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(lambda *_, n=n: fired.__setitem__(n, fired[n] + 1))
        keep.append(acc)
    data = with_exemplars(batch, "cls")
    terms = model(data)
    # the EP gradient was taken in forward (loss_ep carries it), without touching .grad or the hooks
    assert [type(f).__name__ for f, _ in terms["loss_ep"].grad_fn.next_functions] == ["NoneType", "_GradientCarrierBackward"]
    assert fired == [0] * len(params)
    model.parse_losses(terms)[0].backward()
    assert fired == [1] * len(params)


def test_one_optimizer_step_under_gradient_accumulation(tiny_model, batch):
    """mmengine's OptimWrapper (accumulative_counts=2, its loss scaling) steps the same parameters."""
    from mmengine.optim import OptimWrapper

    data = {"data": with_exemplars(batch, "cls"), "data_samples": None}
    after = {}
    for shared in (False, True):
        model = build(tiny_model, shared_prefix=shared)
        model.set_stage(1)
        wrapper = OptimWrapper(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5),
                               accumulative_counts=2)
        wrapper.initialize_count_status(model, 0, 2)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.train_step(data, wrapper)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
        model.train_step(data, wrapper)
        after[shared] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any(not torch.equal(after[shared][n], before[n]) for n in before)
    for name, value in after[False].items():
        torch.testing.assert_close(after[True][name], value, **TOL, msg=name)


def test_unsupported_combination_falls_back_once(tiny_model, batch, monkeypatch, caplog):
    import transformers.utils

    model = build(tiny_model)
    data = with_exemplars(batch, "cls")
    ref_terms, _, ref_tokens = step(model, data, shared=False)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_greater_or_equal_2_10", lambda: False)
    monkeypatch.setattr(model, "attn_implementation", "flash_attention_2")  # only what the check reads
    shared_prefix._logged.clear()
    messages = []
    monkeypatch.setattr(shared_prefix, "_warn", messages.append)
    for _ in range(2):
        terms, _, tokens = step(model, data, shared=True)
    assert tokens == ref_tokens and all(torch.equal(terms[k], ref_terms[k]) for k in terms)
    assert len(messages) == 1 and "flash-attn < 2.1" in messages[0]


def _ddp_worker(rank, world, port, model_path, data, out):
    import os

    import torch.distributed as dist

    from conftest import end_gloo_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(model_path)
    model.set_stage(2)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # as the configs
    total, _ = model.parse_losses(ddp(data))
    total.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    end_gloo_worker()


@pytest.mark.slow
def test_ddp_reduces_the_same_gradients(tiny_model, batch, tmp_path):
    """Two gloo processes with the same batch: DDP's averaged gradients equal the full passes' (its reducer
    sees one backward per step, the EP gradient included)."""
    import socket

    import torch.multiprocessing as mp

    data = with_exemplars(batch, "cls")
    model = build(tiny_model)
    model.set_stage(2)
    _, ref_grads, _ = step(model, data, shared=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tiny_model, data, str(tmp_path / "grads.pt")), nprocs=2)
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert set(grads) == set(ref_grads)
    for name, value in ref_grads.items():
        torch.testing.assert_close(grads[name], value, **TOL, msg=name)
