"""Evaluation of exports (rank / generate), its numbers against scikit-learn, the report files,
chat, the response-ranking plot, and bad input."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from export_fixtures import exports  # noqa: F401  (fixture)
from xtuner_vitask.errors import VITaskError


def cli_args(module, *argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


# ------------------------------------------------------------------------------- fast: the numbers
def test_single_label_metrics_match_sklearn_on_a_known_confusion():
    from xtuner_vitask.evaluation.evaluate import score_predictions

    # rows truth, columns prediction: a known 3-class confusion, plus two unparsable answers (truth 0 and 2)
    confusion = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    truth = [t for t in range(3) for p in range(3) for _ in range(confusion[t, p])]
    pred = [p for t in range(3) for p in range(3) for _ in range(confusion[t, p])]
    truths = [[t] for t in truth] + [[0], [2]]
    preds = [[p] for p in pred] + [None, None]
    report = score_predictions(truths, preds, "multi-class", 3)
    assert report["unparsable"] == 2
    m = report["metrics"]
    # unparsable = wrong and in no class: sklearn with a label (-1) outside the class list
    y_true, y_pred = truth + [0, 2], pred + [-1, -1]
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == pytest.approx(12 / 18)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert m["per_class"]["precision"] == pytest.approx(p.tolist())
    assert m["per_class"]["recall"] == pytest.approx(r.tolist())
    assert m["per_class"]["f1"] == pytest.approx(f.tolist())
    assert m["per_class"]["support"] == s.tolist() == [7, 6, 5]
    assert m["confusion_matrix"] == confusion.tolist()  # unparsable answers are in no cell
    mp = report["metrics_parsable"]
    assert mp["accuracy"] == pytest.approx(12 / 16) and mp["confusion_matrix"] == confusion.tolist()
    assert mp["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))


def test_multi_label_metrics_match_sklearn_and_unparsable_counts_as_wrong():
    from xtuner_vitask.evaluation.evaluate import score_predictions

    truths = [[0], [1, 2], [], [2], [0, 1]]
    preds = [[0], [1], [], None, [0, 1, 2]]
    report = score_predictions(truths, preds, "multi-label", 3)
    hot = lambda rows: np.array([[int(c in r) for c in range(3)] for r in rows])  # noqa: E731
    y_true = hot(truths)
    y_pred = hot(preds[:3] + [[0, 1]] + preds[4:])  # unparsable -> every label wrong
    m = report["metrics"]
    assert m["accuracy"] == pytest.approx((y_true == y_pred).mean())
    assert m["exact_match"] == pytest.approx(accuracy_score(y_true, y_pred)) == pytest.approx(2 / 5)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert report["unparsable"] == 1 and report["metrics_parsable"]["n"] == 4


def test_generate_answers_parse_by_the_data_tools_formats():
    from xtuner_vitask.formats import parse_response

    names = ["melanoma", "melanocytic nevi", "vascular lesions"]
    assert parse_response("multi-class", names, "Melanocytic nevi.") == [1]
    assert parse_response("multi-class", names, "benign") is None  # never mapped to a class


def test_write_report_files_and_summary(tmp_path):
    from xtuner_vitask.evaluation.evaluate import score_predictions, summary_lines, write_report

    scored = score_predictions([[0], [1], [1]], [[0], [1], None], "multi-class", 2)
    task = dict(task_type="multi-class", label_names=["a", "b"], n=3, unparsable=1, metrics=scored["metrics"])
    report = dict(mode="generate", use_ep=False, n=3, seconds=1.0, samples_per_second=3.0, tasks={"toy": task},
                  samples=[])
    written = write_report(report, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == ["confusion_matrix.png", "eval.json"]
    assert json.load(open(tmp_path / "out" / "eval.json"))["tasks"]["toy"]["unparsable"] == 1
    text = "\n".join(summary_lines(report))
    assert "accuracy=0.6667" in text and "unparsable=1/3" in text


# ------------------------------------------------------------------------------- slow: real exports
@pytest.fixture(scope="module")
def test_jsonl(derma_data):
    return os.path.join(derma_data, "test.jsonl")


def _check_report(out, n):
    report = json.load(open(os.path.join(out, "eval.json")))
    assert os.path.getsize(os.path.join(out, "confusion_matrix.png")) > 1000
    samples = report["samples"]
    assert report["n"] == len(samples) == n
    task = next(iter(report["tasks"].values()))
    m = task["metrics"]
    y_true = [s["label"][0] for s in samples]
    y_pred = [s["prediction"][0] if s["parsable"] else -1 for s in samples]
    assert m["accuracy"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=list(range(7)), average="macro",
                                                   zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=list(range(7))).tolist()
    assert len(m["per_class"]["f1"]) == 7
    return report


@pytest.mark.slow
def test_eval_rank_with_ep(exports, test_jsonl, tmp_path, capsys):
    from xtuner_vitask.cli import eval as eval_cli

    out = tmp_path / "rank"
    assert eval_cli.run(cli_args(eval_cli, exports["ep"], "--data", test_jsonl, "--out", out, "--batch-size", 16)) == 0
    report = _check_report(out, 32)
    assert report["use_ep"] and report["mode"] == "rank" and report["unparsable"] == 0
    assert all(len(s["probabilities"]) == 7 for s in report["samples"])
    assert "accuracy=" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_generate_without_ep_counts_unparsable(exports, test_jsonl, tmp_path):
    from xtuner_vitask.cli import eval as eval_cli

    out = tmp_path / "gen"
    args = cli_args(eval_cli, exports["plain"], "--data", test_jsonl, "--mode", "generate", "--out", out,
                    "--max-samples", 16, "--no-progress")
    assert eval_cli.run(args) == 0
    report = _check_report(out, 16)
    assert not report["use_ep"] and report["mode"] == "generate"
    assert report["unparsable"] == sum(not s["parsable"] for s in report["samples"])
    for s in report["samples"]:
        assert (s["prediction"] is None) == (not s["parsable"]) and isinstance(s["answer"], str)


@pytest.mark.slow
def test_eval_bad_input(exports, derma_data, test_jsonl, tmp_path):
    from xtuner_vitask.cli import eval as eval_cli

    with pytest.raises(VITaskError, match="--ep needs the EP export"):
        eval_cli.run(cli_args(eval_cli, exports["plain"], "--data", test_jsonl, "--ep"))
    other = tmp_path / "renamed"
    other.mkdir()
    shutil.copy(test_jsonl, other / "test.jsonl")
    os.symlink(os.path.join(derma_data, "images"), other / "images")
    meta = json.load(open(os.path.join(derma_data, "meta.json")))
    meta["label_names"] = meta["label_names"][::-1]
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VITaskError, match="label_names differ from the model's training meta.json"):
        eval_cli.run(cli_args(eval_cli, exports["ep"], "--data", other / "test.jsonl"))
    broken = tmp_path / "broken_export"
    shutil.copytree(exports["plain"], broken)
    os.remove(broken / "modeling_internvl_chat.py")
    with pytest.raises(VITaskError, match="incomplete: missing modeling_internvl_chat.py"):
        eval_cli.run(cli_args(eval_cli, broken, "--data", test_jsonl))


@pytest.mark.slow
def test_chat_one_shot_and_unreadable_image(exports, derma_data, tmp_path, capsys):
    from xtuner_vitask.cli import chat

    image = os.path.join(derma_data, "images", "test", "00000.png")
    for folder, flag in ((exports["ep"], "--ep"), (exports["ep"], "--no-ep"), (exports["plain"], "--no-ep")):
        assert chat.run(cli_args(chat, folder, "--image", image, "--prompt", "What is the diagnosis?",
                                 "--max-new-tokens", 8, flag)) == 0
        assert capsys.readouterr().out.endswith("\n")  # the answer (a 3-step model may answer "")
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    with pytest.raises(VITaskError, match="cannot read image"):
        chat.run(cli_args(chat, exports["plain"], "--image", bad, "--prompt", "hi"))


@pytest.mark.slow
def test_chat_interactive_loop(exports, derma_data, monkeypatch, capsys):
    from xtuner_vitask.cli import chat

    lines = iter(["What is it?", "", "And now?", "", "exit", ""])
    monkeypatch.setattr("builtins.input", lambda *a: next(lines))
    image = os.path.join(derma_data, "images", "test", "00001.png")
    assert chat.run(cli_args(chat, exports["plain"], "--image", image, "--max-new-tokens", 6)) == 0
    out = capsys.readouterr().out
    assert out.count("double enter to end input") == 3 and "Exit" in out


@pytest.mark.slow
def test_ranking_plot(exports, test_jsonl, tmp_path):
    from xtuner_vitask.cli import ranking_plot

    png = tmp_path / "fig4.png"
    assert ranking_plot.run(cli_args(ranking_plot, exports["ep"], "--data", test_jsonl, "--out", png,
                                     "--max-samples", 16)) == 0
    assert os.path.getsize(png) > 1000
    numbers = json.load(open(tmp_path / "fig4.json"))
    assert numbers["n_pairs"] == 16 and numbers["use_ep"]
    assert all(0 <= p <= 1 for p in numbers["positive"] + numbers["negative"])


@pytest.mark.slow
@pytest.mark.parametrize("variant,use_ep", [("plain", False), ("ep", True), ("ep", False)])
def test_shared_prefix_ranking_gives_the_full_sequence_scores(exports, test_jsonl, variant, use_ep):
    import torch

    from xtuner_vitask.evaluation.evaluate import _load_dataset, read_records
    from xtuner_vitask.evaluation.prefix_rank import rank_batch_shared_prefix
    from xtuner_vitask.evaluation.ranking import candidate_responses, rank_batch
    from xtuner_vitask.export import inspect_export, load_export_model, read_task_meta

    info = inspect_export(exports[variant])
    model = load_export_model(info, use_ep=use_ep)
    dataset = _load_dataset(info, test_jsonl, use_ep)
    records = read_records(test_jsonl, max_samples=5)
    candidates = candidate_responses(read_task_meta(info))
    folder = os.path.dirname(test_jsonl)
    full = rank_batch(model, dataset, records, folder, candidates, use_ep=use_ep)
    shared = rank_batch_shared_prefix(model, dataset, records, folder, candidates, use_ep=use_ep)
    assert full.shape == shared.shape == (5, 7)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
