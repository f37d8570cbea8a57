"""CRT negatives are loaded only where the step uses them: none in stage 1, a sample's own negative only when its
batch has no partner; partners drawn at random among the eligible (seeded); the stage hook's switch with
DataLoader workers, at an epoch boundary (exact) and mid-epoch (completed in the main process)."""
import multiprocessing
from collections import Counter

import numpy as np
import pytest
import torch
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader

import xtuner_vitask.datasets.internvl as internvl_dataset
from xtuner_vitask.datasets import VITaskDataset, vitask_collate_fn
from xtuner_vitask.datasets.vitask import LazyNegative, batch_rng, pair_negatives
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.hooks import VITaskStageHook


def dataset(tiny_model, data, **kw):
    return VITaskDataset(tiny_model, f"{data}/train.jsonl", tsm_img_size=32, max_length=512, **kw)


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes, also in forked DataLoader workers (a counter in shared memory)."""
    counter = multiprocessing.get_context("fork").Value("i", 0)
    real = internvl_dataset.read_image

    def counting(*args, **kwargs):
        with counter.get_lock():
            counter.value += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(internvl_dataset, "read_image", counting)
    return counter


def fake_negatives(n):
    return [LazyNegative(100 + i, lambda index: torch.full((1, 1), float(index))) for i in range(n)]


# ---------------------------------------------------------------------------------------- partners
def test_partner_is_drawn_uniformly_among_the_eligible():
    # sample 0 (response 0) has four eligible partners (responses 1..4); sample 5 has another instruction
    keys = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]
    counts = Counter()
    n = 4000
    for b in range(n):  # 4000 different batches (their sample indices seed the draw)
        out = pair_negatives(keys, [1] * 6, fake_negatives(6), batch_rng(0, range(b, b + 6)))
        counts[out["neg_image_index"][0].item()] += 1
    assert set(counts) == {1, 2, 3, 4}
    chi2 = sum((c - n / 4) ** 2 / (n / 4) for c in counts.values())
    assert chi2 < 21.1, counts  # 3 degrees of freedom: p < 1e-4 for a uniform draw


def test_a_batchs_negatives_spread_over_the_other_class():
    # 4 samples of each of two responses: each picks one of the 4 others; the first-eligible rule gave 1 image
    keys = [(0, 0)] * 4 + [(0, 1)] * 4
    distinct = []
    for b in range(2000):
        index = pair_negatives(keys, [1] * 8, fake_negatives(8), batch_rng(7, range(b, b + 8)))["neg_image_index"]
        distinct.append(len(set(index[:4].tolist())))
    expected = 4 * (1 - (3 / 4) ** 4)  # distinct picks of 4 uniform draws from 4 images: 2.73
    assert abs(np.mean(distinct) - expected) < 0.05


def test_partners_are_reproducible_and_seeded():
    keys = [(0, 0)] * 4 + [(0, 1)] * 4
    draw = lambda seed, idx: pair_negatives(keys, [1] * 8, fake_negatives(8), batch_rng(seed, idx))["neg_image_index"]  # noqa: E731
    assert all(torch.equal(draw(3, range(i, i + 8)), draw(3, range(i, i + 8))) for i in range(20))
    assert any(not torch.equal(draw(3, range(i, i + 8)), draw(4, range(i, i + 8))) for i in range(20))


def test_without_partner_the_own_negative_is_decoded_once_per_image():
    keys = [(0, 0), (0, 0), (1, 0), (1, 1)]
    loaded = []
    load = lambda index: loaded.append(index) or torch.full((1, 1), float(index))  # noqa: E731
    negatives = [LazyNegative(9, load), LazyNegative(9, load), LazyNegative(5, load), LazyNegative(6, load)]
    out = pair_negatives(keys, [2, 1, 1, 1], negatives, batch_rng(0, range(4)))
    assert loaded == [9]  # samples 2 and 3 are each other's partner; 0 and 1 share one drawn image
    assert out["neg_image_index"].tolist() == [5, 5, 4, 3]  # tiles: 0-1, 2, 3, 4; extra image at 5
    assert out["neg_pixel_values"].tolist() == [[9.0]]


# ---------------------------------------------------------------------------------- the data path
def test_stage1_decodes_one_image_per_sample(tiny_model, derma_data, decodes):
    ds = dataset(tiny_model, derma_data, negatives="stage2")
    loader = DataLoader(ds, batch_size=8, collate_fn=vitask_collate_fn)
    batches = [b["data"] for _, b in zip(range(3), loader)]
    assert decodes.value == 24  # one image per sample: its own (the TSM input reuses it)
    assert all("neg_image_index" not in b and "neg_pixel_values" not in b for b in batches)

    ds.set_negatives(True)  # stage 2: only samples without an in-batch partner decode their negative
    decodes.value = 0
    batches = [b["data"] for _, b in zip(range(3), loader)]
    extras = sum(0 if b["neg_pixel_values"] is None else len(b["neg_pixel_values"]) for b in batches)
    assert decodes.value == 24 + extras
    assert extras < 24  # 8 samples of a 7-class set always contain partners


def test_default_negatives_true_loads_from_the_start(tiny_model, derma_data):
    ds = dataset(tiny_model, derma_data)
    assert ds.loads_negatives and "negative" in ds[0]
    with pytest.raises(VITaskError, match="negatives='banana'"):
        dataset(tiny_model, derma_data, negatives="banana")


def test_main_process_completion_equals_the_collate(tiny_model, derma_data):
    on = dataset(tiny_model, derma_data, seed=5)
    off = dataset(tiny_model, derma_data, seed=5, negatives="stage2")
    for start in (0, 8, 40):
        items = list(range(start, start + 8))
        collated = vitask_collate_fn([on[i] for i in items])["data"]
        completed = off.attach_negatives(vitask_collate_fn([off[i] for i in items])["data"])
        # a batch a worker prepared while the stage switched: some samples with negatives, some without
        mixed = vitask_collate_fn([(on if k % 2 else off)[i] for k, i in enumerate(items)])["data"]
        assert "neg_image_index" not in mixed
        mixed = off.attach_negatives(mixed)
        for other in (completed, mixed):
            assert torch.equal(collated["neg_image_index"], other["neg_image_index"])
            if collated["neg_pixel_values"] is None:
                assert other["neg_pixel_values"] is None
            else:
                assert torch.equal(collated["neg_pixel_values"], other["neg_pixel_values"])


# ------------------------------------------------------------------- the stage hook, with workers
class FakeModel:
    """What the stage hook touches of VITaskInternVL: stage, set_stage, use_crt, the connector."""

    def __init__(self, use_crt=True):
        self.stage, self.use_crt = 1, use_crt
        self.connector = torch.nn.Linear(1, 1)

    def set_stage(self, stage):
        self.stage = stage
        self.connector.requires_grad_(stage == 1)


class FakeOptimWrapper:
    def __init__(self, model):
        self.param_groups = [dict(params=[], lr=1e-4, weight_decay=0.05),
                             dict(params=list(model.connector.parameters()), name="connector", lr=1e-4,
                                  weight_decay=0.05)]


class FakeRunner:
    def __init__(self, loader, max_iters, use_crt=True):
        self.train_dataloader, self.max_iters, self.iter = loader, max_iters, 0
        self.model = FakeModel(use_crt)
        self.optim_wrapper = FakeOptimWrapper(self.model)


def run_loop(hook, runner):
    """mmengine's IterBasedTrainLoop order: iterator (workers start) before before_train; each batch is fetched
    before before_train_iter; the epoch's end restarts the iterator."""
    iterator = _InfiniteDataloaderIterator(runner.train_dataloader)
    hook.before_train(runner)
    seen = []
    while runner.iter < runner.max_iters:
        batch = next(iterator)
        delivered = "neg_image_index" in batch["data"]
        hook.before_train_iter(runner, runner.iter, batch)
        seen.append((runner.model.stage, delivered, "neg_image_index" in batch["data"]))
        hook.after_train_iter(runner, runner.iter, batch)
        runner.iter += 1
    return seen


@pytest.fixture
def no_sleep(monkeypatch):
    import mmengine.runner.loops as loops

    monkeypatch.setattr(loops.time, "sleep", lambda s: None)  # mmengine sleeps 2 s at every epoch end


def workers_loader(ds, persistent=False):
    return DataLoader(ds, batch_size=8, shuffle=False, num_workers=2, collate_fn=vitask_collate_fn,
                      multiprocessing_context="fork", persistent_workers=persistent)


@pytest.mark.parametrize("persistent", [False, True], ids=["new-workers-each-epoch", "persistent-workers"])
def test_epoch_boundary_switch_with_workers_is_exact(tiny_model, derma_data, no_sleep, persistent):
    ds = dataset(tiny_model, derma_data, negatives="stage2")  # 96 samples: 12 iterations per epoch
    runner = FakeRunner(workers_loader(ds, persistent), max_iters=24)
    hook = VITaskStageHook(switch_epoch=1)
    seen = run_loop(hook, runner)
    assert seen == [(1, False, False)] * 12 + [(2, True, True)] * 12  # delivered by the workers, none in stage 1
    assert hook._completed == 0


def test_mid_epoch_switch_with_workers_completes_prefetched_batches(tiny_model, derma_data, no_sleep, monkeypatch):
    logged = []
    monkeypatch.setattr("xtuner_vitask.hooks.stage.print_log", lambda msg, **kw: logged.append(msg))
    ds = dataset(tiny_model, derma_data, negatives="stage2")
    runner = FakeRunner(workers_loader(ds), max_iters=12)
    hook = VITaskStageHook(switch_iter=6)
    seen = run_loop(hook, runner)
    assert [s[0] for s in seen] == [1] * 6 + [2] * 6
    assert not any(delivered for stage, delivered, _ in seen if stage == 1)
    assert all(has for stage, _, has in seen if stage == 2)  # every stage-2 step gets its negatives
    assert 1 <= hook._completed <= 4  # at most the workers' prefetch (2 workers x 2 batches)
    assert any("prepared before stage 2" in m for m in logged)


def test_crt_without_dataset_negatives_fails_before_training(tiny_model, derma_data):
    ds = dataset(tiny_model, derma_data, negatives=False)
    runner = FakeRunner(DataLoader(ds, batch_size=8, collate_fn=vitask_collate_fn), max_iters=24)
    with pytest.raises(VITaskError, match="negatives=False"):
        VITaskStageHook(switch_epoch=1).before_train(runner)
    runner.model.use_crt = False  # no CRT: nothing to load, nothing to complain about
    VITaskStageHook(switch_epoch=1).before_train(runner)
    assert not ds.loads_negatives
