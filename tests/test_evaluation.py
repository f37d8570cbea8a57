"""The evaluation pipeline on the tiny model, no training: one input processor, the two ranking strategies
(same scores, plain and EP, Cache objects and legacy tuple caches), merged multi-task sets per task,
Fig. 4's probabilities against ranking, sharding over 2 gloo processes, and bad data."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from xtuner_vitask.errors import VITaskError

EXEMPLAR_DIM = 16


class Exemplars:
    """A stand-in exemplar cache: a fixed random feature per record id ('cls': (D,), else (T, D))."""

    def __init__(self, tokens=None):
        self.tokens = tokens

    def __getitem__(self, ids):
        rows = []
        for record_id in ids:
            g = torch.Generator().manual_seed(sum(map(ord, record_id)))
            shape = (EXEMPLAR_DIM,) if self.tokens is None else (self.tokens, EXEMPLAR_DIM)
            rows.append(torch.randn(shape, generator=g))
        return torch.stack(rows)


def load_wrapper(model_path, ep=False):
    """The project's wrapper on a checkpoint folder, frozen, fp32, eager attention."""
    common = dict(freeze_llm=True, freeze_visual_encoder=True, llm_lora=None, attn_implementation="eager",
                  torch_dtype="float32", activation_checkpointing=False)
    if ep:
        from xtuner_vitask.models.vitask import VITaskInternVL

        model = VITaskInternVL(model_path, tsm=None, exemplar_dim=EXEMPLAR_DIM, **common)
    else:
        from xtuner_vitask.models.internvl import InternVL2

        model = InternVL2(model_path, freeze_mlp1=True, **common)
    return model.eval()


@pytest.fixture(scope="module")
def vitask_model(tiny_model):
    torch.manual_seed(0)
    return load_wrapper(tiny_model, ep=True)


@pytest.fixture(scope="module")
def inputs(tiny_model):
    from xtuner_vitask.evaluation.inputs import ModelInputs

    return ModelInputs.for_model(tiny_model)


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def llm_model(request, tmp_path_factory):
    """(VITask wrapper, its ModelInputs) on a tiny of each cache kind: Qwen2 (transformers Cache objects) and
    InternLM2 (InternVL2's remote code: legacy tuples in and out)."""
    from xtuner_vitask.evaluation.inputs import ModelInputs
    from xtuner_vitask.testing import build_tiny_internvl

    path = str(build_tiny_internvl(tmp_path_factory.mktemp("llm") / request.param, llm=request.param))
    torch.manual_seed(0)
    return request.param, load_wrapper(path, ep=True), ModelInputs.for_model(path), path


@pytest.fixture(scope="module")
def derma_meta(derma_data):
    from xtuner_vitask.contract import load_meta

    return load_meta(derma_data)


def _records(derma_data, meta, n=6):
    from xtuner_vitask.evaluation.evaluate import read_records

    return read_records(os.path.join(derma_data, "test.jsonl"), meta, max_samples=n)


# ------------------------------------------------------------------------------------ inputs
def test_prompt_is_the_training_prompt_and_a_prefix_of_every_training_sequence(tiny_model, derma_data, inputs):
    from xtuner_vitask.datasets.internvl import InternVL2Dataset

    train = InternVL2Dataset(tiny_model, os.path.join(derma_data, "train.jsonl"), dynamic_image_size=False)
    record = train.data[0]
    seq = train.get_inputid_labels(record["conversations"], inputs.image_token_str(1))
    prompt = inputs.record_prompt_ids(record, 1)
    first_target = next(i for i, lab in enumerate(seq["labels"]) if lab != -100)
    assert prompt == seq["input_ids"][:first_target]  # the dataset's own tokens, cut where the answer starts
    stops = inputs.tokenizer.convert_ids_to_tokens(inputs.stop_ids())
    assert stops[0] == "<|im_end|>" and len(set(stops)) == len(stops)  # Hermes-2's turn end first, no repeats
    # a second turn continues the first one's tokens (chat)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a lesion"},
             {"from": "human", "value": "Sure?"}]
    two = inputs.prompt_ids(turns, 1)
    one = inputs.sequence(turns[:2], 1)["input_ids"]
    assert two[:len(one)] == one and len(two) > len(one)


# ------------------------------------------------------------------------ ranking strategies
@pytest.mark.parametrize("ep_mode,tokens", [(None, None), ("cls", None), ("rep", 3)])
def test_shared_prefix_ranking_gives_the_full_sequence_scores(llm_model, derma_data, derma_meta, ep_mode, tokens,
                                                              monkeypatch):
    from xtuner_vitask.evaluation import ranking

    llm, model, inputs, _ = llm_model
    use_ep = ep_mode is not None
    monkeypatch.setattr(model, "ep_mode", ep_mode or "cls")
    caches = []
    repeat = ranking.repeat_kv_cache
    monkeypatch.setattr(ranking, "repeat_kv_cache", lambda past, n: (caches.append(type(past)), repeat(past, n))[1])
    records = _records(derma_data, derma_meta)
    candidates = ranking.candidate_responses(derma_meta.task())
    args = (model, inputs, records, derma_data, candidates)
    kwargs = dict(use_ep=use_ep, batch_size=4, exemplars=Exemplars(tokens) if use_ep else None, progress=False)
    full = ranking.rank_records(*args, strategy="full-sequence", **kwargs)
    shared = ranking.rank_records(*args, strategy="shared-prefix", **kwargs)
    assert full.shape == shared.shape == (6, 7)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-4)  # log-likelihoods: absolute
    assert full.std() > 0  # real scores, not a constant
    assert len(caches) == 2 and all(c is (tuple if llm == "internlm2" else DynamicCache) for c in caches)


def test_generation_and_chat_give_the_same_answers_on_both_cache_kinds(llm_model, derma_data, derma_meta):
    """Greedy answers: batched (left-padded prompts of different lengths) = one by one = chat's answer to the
    same instruction about the same image (chat builds its prompt like a training conversation)."""
    from xtuner_vitask.evaluation.generate import generate_records
    from xtuner_vitask.inference.chat import ChatSession

    _, model, inputs, path = llm_model
    records = _records(derma_data, derma_meta, 3)
    records[1] = dict(records[1], conversations=[dict(t) for t in records[1]["conversations"]])
    records[1]["conversations"][0]["value"] += " Answer briefly."  # a longer prompt: the batch is padded
    batched = generate_records(model.model, inputs, records, derma_data, batch_size=3, max_new_tokens=4,
                               progress=False)
    one_by_one = [generate_records(model.model, inputs, [r], derma_data, max_new_tokens=4, progress=False)[0]
                  for r in records]
    assert batched == one_by_one and all(batched)
    session = ChatSession(path, os.path.join(derma_data, records[1]["image"]))
    question = records[1]["conversations"][0]["value"].replace("<image>", "")
    assert session.ask(question, max_new_tokens=4) == batched[1]
    session.ask("Sure?", max_new_tokens=2)  # the second turn continues the first (tokens: test_prompt_is_...)
    assert [t["from"] for t in session.history] == ["human", "gpt"] * 2 and session.history[1]["value"] == batched[1]


def test_repeat_kv_cache_repeats_rows_of_tuples_and_cache_objects():
    from xtuner_vitask.evaluation.ranking import repeat_kv_cache

    k, v = torch.arange(2 * 4 * 3).float().view(2, 1, 4, 3), -torch.arange(2 * 4 * 3).float().view(2, 1, 4, 3)
    legacy = ((k, v), (k + 1, v + 1))
    repeated = repeat_kv_cache(legacy, 3)
    assert repeated[1][0].shape == (6, 1, 4, 3) and torch.equal(repeated[1][0][3], k[1] + 1)
    cache = repeat_kv_cache(DynamicCache.from_legacy_cache(legacy), 3)
    assert all(torch.equal(a, b) for la, lb in zip(cache.to_legacy_cache(), repeated) for a, b in zip(la, lb))
    with pytest.raises(VITaskError, match="full-sequence"):
        repeat_kv_cache(object(), 2)


# --------------------------------------------------------------------------- Fig. 4 analysis
def test_response_probabilities_agree_with_ranking(vitask_model, inputs, derma_data, derma_meta):
    """Fig. 4's per-token probabilities of a record's own response multiply to its ranking likelihood."""
    from xtuner_vitask.analysis.response_ranking import token_probabilities
    from xtuner_vitask.evaluation.ranking import candidate_responses, rank_records

    records = _records(derma_data, derma_meta, 4)
    candidates = candidate_responses(derma_meta.task())
    scores = rank_records(vitask_model, inputs, records, derma_data, candidates, progress=False)
    probs = token_probabilities(vitask_model, inputs, records, records, derma_data)
    own = [scores[i, r["label"][0]].item() for i, r in enumerate(records)]
    np.testing.assert_allclose([np.log(p).sum() for p in probs], own, rtol=0, atol=1e-4)
    other = token_probabilities(vitask_model, inputs, records, records[::-1], derma_data)  # another image shown
    assert not np.allclose([p.mean() for p in probs], [p.mean() for p in other])


# ----------------------------------------------------------------------------- merged sets
@pytest.fixture(scope="module")
def merged_data(tmp_path_factory, derma_data):
    from xtuner_vitask.data.convert import convert_medmnist
    from xtuner_vitask.data.merge import merge_sets
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    root = tmp_path_factory.mktemp("merged")
    npz = write_medmnist_npz(root / "pneumoniamnist.npz", "pneumoniamnist", n_per_split=(16, 8, 8), size=28, seed=1)
    pneumonia = convert_medmnist("pneumoniamnist", 28, root / "pneumoniamnist", npz_path=npz, progress=False)
    return str(merge_sets([derma_data, pneumonia], root / "merged", progress=False))


def test_merged_set_is_evaluated_per_task_in_each_label_space(vitask_model, inputs, merged_data, derma_data):
    from xtuner_vitask.contract import load_meta
    from xtuner_vitask.evaluation.evaluate import evaluate_records, read_records

    meta = load_meta(merged_data)
    assert meta.multi_task
    test = os.path.join(merged_data, "test.jsonl")
    records = read_records(test, meta)
    out = evaluate_records(vitask_model, inputs, records, meta, merged_data, progress=False, batch_size=8)
    assert set(out["tasks"]) == {"dermamnist", "pneumoniamnist"}
    for task, rep in out["tasks"].items():
        assert rep["n"] == sum(r["task"] == task for r in records)
        assert len(rep["metrics"]["per_class"]["f1"]) == meta.tasks[task].num_classes
        # the same numbers as evaluating the task's records alone, as a single set with its own meta
        own = [r for r in records if r["task"] == task]
        alone = evaluate_records(vitask_model, inputs, own, meta.tasks[task].as_dict(), merged_data, progress=False)
        (only,) = alone["tasks"].values()
        assert only["metrics"]["confusion_matrix"] == rep["metrics"]["confusion_matrix"]
        assert only["metrics"]["macro_f1"] == pytest.approx(rep["metrics"]["macro_f1"])


# ------------------------------------------------------------------------- 2 processes (gloo)
def _evaluate_in_process(rank, world, port, model_path, data_dir, out_file, hook_dir):
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
    from xtuner_vitask.evaluation.evaluate import evaluate_records, read_records
    from xtuner_vitask.evaluation.inputs import ModelInputs

    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    model = load_wrapper(model_path)
    records = read_records(os.path.join(data_dir, "test.jsonl"), meta, max_samples=11)  # 11: an uneven split
    out = evaluate_records(model, ModelInputs.for_model(model_path), records, meta, data_dir, batch_size=4,
                           progress=False, distributed=True)
    hook = run_hook_once(model, model_path, data_dir, hook_dir)
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(dict(out, hook=hook), f)
    if world > 1:
        from conftest import end_gloo_worker

        end_gloo_worker()


def run_hook_once(model, model_path, data_dir, work_dir):
    """VITaskEvalHook's evaluation and best-checkpoint bookkeeping on a stand-in runner."""
    from xtuner_vitask.datasets.internvl import InternVL2Dataset
    from xtuner_vitask.hooks.eval import INFO_KEY, VITaskEvalHook

    dataset = InternVL2Dataset(model_path, os.path.join(data_dir, "train.jsonl"), dynamic_image_size=False)
    runner = FakeRunner(model, dataset, work_dir, iteration=3)
    hook = VITaskEvalHook(interval=4, max_samples=11, batch_size=4)
    hook.before_train(runner)
    hook.after_train_iter(runner, 0)
    return dict(metrics={k: runner.message_hub.get_scalar(k).current() for k in runner.message_hub.log_scalars},
                info=runner.message_hub.get_info(INFO_KEY), saved=runner.saved)


@pytest.mark.slow  # two spawned interpreters import the stack (~1 CPU-minute)
def test_two_gloo_processes_give_the_one_process_metrics(tiny_model, derma_data, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "out")
    mp.start_processes(_evaluate_in_process, args=(2, port, tiny_model, derma_data, out, str(tmp_path / "w2")),
                       nprocs=2, start_method="spawn")
    _evaluate_in_process(0, 1, None, tiny_model, derma_data, out + ".single", str(tmp_path / "w1"))
    single = json.load(open(out + ".single.0"))
    ranks = [json.load(open(f"{out}.{r}")) for r in range(2)]
    for report in ranks:  # every rank has every result, in record order
        assert [s["id"] for s in report["samples"]] == [s["id"] for s in single["samples"]]
        assert [s["prediction"] for s in report["samples"]] == [s["prediction"] for s in single["samples"]]
        np.testing.assert_allclose([s["probabilities"] for s in report["samples"]],
                                   [s["probabilities"] for s in single["samples"]], atol=1e-5)
        (task,) = report["tasks"].values()
        (ref,) = single["tasks"].values()
        assert task["metrics"]["confusion_matrix"] == ref["metrics"]["confusion_matrix"]
        assert task["metrics"]["macro_f1"] == ref["metrics"]["macro_f1"] and task["n"] == 11
        # the hook: same metrics, same best decision on both ranks; one best file, written once
        assert report["hook"]["metrics"] == pytest.approx(single["hook"]["metrics"], abs=1e-9)
        assert report["hook"]["info"]["score"] == pytest.approx(single["hook"]["info"]["score"])
    assert ranks[0]["hook"]["saved"] == ranks[1]["hook"]["saved"] == ["best_macro_f1_no_ep_iter_4.pth"]
    assert sorted(os.listdir(tmp_path / "w2")) == ["best_macro_f1_no_ep_iter_4.pth"]


class FakeRunner:
    """What VITaskEvalHook uses of an mmengine runner; save_checkpoint writes a file (main process) or folder."""

    def __init__(self, model, dataset, work_dir, iteration=0, max_iters=100, folders=False, message_hub=None):
        from types import SimpleNamespace

        from mmengine.dist import is_main_process
        from mmengine.logging import MessageHub

        self.model, self.work_dir, self.iter, self.max_iters = model, str(work_dir), iteration, max_iters
        self.train_dataloader = SimpleNamespace(dataset=dataset)
        self.message_hub = message_hub or MessageHub(f"fake_{id(self)}")
        self.visualizer, self.folders, self.saved = None, folders, []
        self._main = is_main_process()
        os.makedirs(self.work_dir, exist_ok=True)

    def save_checkpoint(self, out_dir, filename, **kwargs):
        self.saved.append(filename)
        path = os.path.join(out_dir, filename)
        if self.folders:  # DeepSpeed ZeRO-3 saves a folder (every rank writes its part)
            os.makedirs(path, exist_ok=True)
        elif self._main:
            with open(path, "w") as f:
                f.write(json.dumps(self.message_hub.get_info("vitask_eval")))
        self.message_hub.update_info("last_ckpt", path)


# ------------------------------------------------------------------------------- bad data
def _write_set(tmp_path, derma_data, edit):
    """A copy of the derma test split whose first record is changed by ``edit(record, folder)``."""
    folder = tmp_path / "bad"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(derma_data, "meta.json"), folder / "meta.json")
    os.symlink(os.path.join(derma_data, "images"), folder / "images")
    records = [json.loads(line) for line in open(os.path.join(derma_data, "test.jsonl"))][:4]
    edit(records[0], folder)
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(folder / "test.jsonl"), json.load(open(folder / "meta.json"))


@pytest.mark.parametrize("edit,message", [
    (lambda r, f: r.update(label=[-1]), r"line 1: label -1 is outside dermamnist's classes 0\.\.6"),
    (lambda r, f: r.update(label=[12]), r"line 1: label 12 is outside dermamnist's classes 0\.\.6"),
    (lambda r, f: r.update(label=[0, 1]), r"line 1: a multi-class record has exactly one label, got \[0, 1\]"),
    (lambda r, f: r.update(image=["a.png", "b.png"]), r"line 1: 'image' must be one path"),
    (lambda r, f: (f.joinpath("text.png").write_text("not an image"), r.update(image="text.png")),
     r"line 1: cannot read image \(UnidentifiedImageError.*: .*text\.png"),
    (lambda r, f: r.update(image="images/nowhere.png"), r"line 1: image does not exist: .*nowhere\.png"),
])
def test_bad_records_are_reported_by_line_before_any_model_loads(tmp_path, derma_data, edit, message):
    from xtuner_vitask.evaluation.evaluate import read_records

    path, meta = _write_set(tmp_path, derma_data, edit)
    with pytest.raises(VITaskError, match=r"1 of 4 records in .*test\.jsonl cannot be used \(fix or remove them\):\n  "
                                          + message):
        read_records(path, meta)


def test_every_bad_record_is_reported_at_once(tmp_path, derma_data):
    from xtuner_vitask.evaluation.evaluate import read_records

    path, meta = _write_set(tmp_path, derma_data, lambda r, f: r.update(label=[9]))
    lines = open(path).read().splitlines()
    lines[2] = "{not json"
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(VITaskError, match=r"2 of 4 records .*\n  line 1: label 9 .*\n  line 3: not JSON"):
        read_records(path, meta)
    # a one-element image list is XTuner's form of one image: accepted, read as the path
    path, meta = _write_set(tmp_path / "x", derma_data, lambda r, f: r.update(image=[r["image"]]))
    assert isinstance(read_records(path, meta)[0]["image"], str)


def test_read_records_arguments(derma_data, derma_meta):
    from xtuner_vitask.evaluation.evaluate import read_records

    assert len(read_records(os.path.join(derma_data, "test.jsonl"), derma_meta, max_samples=3)) == 3
    with pytest.raises(VITaskError, match="max_samples=0: use a positive number"):
        read_records(os.path.join(derma_data, "test.jsonl"), derma_meta, max_samples=0)
    with pytest.raises(VITaskError, match="is a folder: pass one of its JSONL files"):
        read_records(derma_data, derma_meta)
