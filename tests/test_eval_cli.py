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
from xtuner_vitask.formats import parse_response
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


# ------------------------------------------------------------------------- fast: bad arguments (issue 13)
def run_main(capsys, *argv):
    """`xtuner-vitask ARGV` in process: (exit status, stderr)."""
    from xtuner_vitask.cli.main import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code, err, message):
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("as_folder", [False, True])  # DeepSpeed saves iter_N.pth as a folder
def test_eval_of_a_training_checkpoint_says_export_it_first(tmp_path, capsys, as_folder):
    checkpoint = tmp_path / "iter_24.pth"
    checkpoint.mkdir() if as_folder else checkpoint.write_bytes(b"weights")
    (tmp_path / "test.jsonl").write_text("{}\n")
    code, err = run_main(capsys, "eval", checkpoint, "--data", tmp_path / "test.jsonl")
    one_line_error(code, err, f"{checkpoint} is a training checkpoint, not an exported model folder: export it first "
                              f"(xtuner convert pth_to_hf CONFIG {checkpoint} OUT_DIR) and pass OUT_DIR")


def test_eval_data_must_be_a_jsonl_file_and_max_samples_positive(tmp_path, capsys, derma_data):
    model = tmp_path / "export"
    model.mkdir()
    code, err = run_main(capsys, "eval", model, "--data", derma_data)
    one_line_error(code, err, f"--data {derma_data} is a folder: pass one of its JSONL files (e.g. "
                              f"{os.path.join(derma_data, 'test.jsonl')})")
    code, err = run_main(capsys, "eval", model, "--data", tmp_path / "missing.jsonl")
    one_line_error(code, err, "missing.jsonl does not exist")
    code, err = run_main(capsys, "eval", model, "--data", tmp_path / "x.jsonl", "--max-samples", 0)
    one_line_error(code, err, "--max-samples 0: use a positive number (leave it out for all)")
    code, err = run_main(capsys, "ranking-plot", model, "--data", tmp_path / "x.jsonl", "--out", tmp_path / "f.png",
                         "--max-samples", -3)
    one_line_error(code, err, "--max-samples -3: use a positive number")


def test_chat_checks_the_image_before_the_model(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    # the model folder does not exist either: the image is checked first, before anything loads
    code, err = run_main(capsys, "chat", tmp_path / "no_model", "--image", bad, "--prompt", "hi")
    one_line_error(code, err, f"{bad}: cannot read image (UnidentifiedImageError")
    assert err.rstrip().endswith("pass a PNG, JPEG or TIFF file with --image"), err
    code, err = run_main(capsys, "chat", tmp_path / "no_model", "--image", tmp_path / "gone.png", "--prompt", "hi")
    one_line_error(code, err, "gone.png: image does not exist: pass a PNG, JPEG or TIFF file with --image")


def test_model_loading_log_is_quiet_unless_verbose():
    import logging

    from mmengine.logging import MMLogger, print_log

    from xtuner_vitask.inference.exports import quiet_logs

    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        with quiet_logs(verbose=False):
            print_log("InternVL_V1_5(the model tree)", logger="current")
            print_log("a warning still shows", logger="current", level=logging.WARNING)
        print_log("after the load", logger="current")  # the level is restored
        with quiet_logs(verbose=True):
            print_log("shown with --verbose", logger="current")
    finally:
        logger.removeHandler(handler)
    assert shown == ["a warning still shows", "after the load", "shown with --verbose"]


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
def test_eval_rank_with_ep(exports, test_jsonl, tmp_path, capfd):
    from xtuner_vitask.cli import eval as eval_cli

    out = tmp_path / "rank"
    assert eval_cli.run(cli_args(eval_cli, exports["ep"], "--data", test_jsonl, "--out", out, "--batch-size", 16)) == 0
    report = _check_report(out, 32)
    assert report["use_ep"] and report["mode"] == "rank" and report["unparsable"] == 0
    for s in report["samples"]:  # a distribution over the 7 classes whose mode is the prediction
        assert len(s["probabilities"]) == 7 and sum(s["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert s["prediction"] == [int(np.argmax(s["probabilities"]))]
    out = capfd.readouterr().out
    assert "accuracy=" in out and "construction is complete" not in out  # XTuner's model print is quiet


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
    names = next(iter(report["tasks"].values()))["label_names"]
    for s in report["samples"]:  # every prediction is what the data_tools format reads in the answer
        assert s["prediction"] == parse_response("multi-class", names, s["answer"])
        assert (s["prediction"] is None) == (not s["parsable"])


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
    assert numbers["n_pairs"] == len(numbers["positive"]) == len(numbers["negative"]) == 16 and numbers["use_ep"]
    assert numbers["ranked_correctly"] == pytest.approx(np.mean(np.greater(numbers["positive"], numbers["negative"])))
    # the values themselves: tests/test_evaluation.py checks them against the ranking likelihoods


@pytest.mark.slow
def test_eval_generate_with_ep_and_rank_without_ep_on_internlm2(exports, test_jsonl, tmp_path):
    """The two remaining eval combinations, with the attention flag: InternLM2 has no SDPA."""
    from xtuner_vitask.cli import eval as eval_cli

    for mode, flag in (("generate", "--ep"), ("rank", "--no-ep")):
        out = tmp_path / f"{mode}{flag}"
        args = cli_args(eval_cli, exports["ep"], "--data", test_jsonl, "--mode", mode, flag, "--out", out,
                        "--max-samples", 8, "--no-progress", "--attn-implementation", "eager")
        assert eval_cli.run(args) == 0
        report = _check_report(out, 8)
        assert report["use_ep"] == (flag == "--ep") and report["mode"] == mode
    with pytest.raises(VITaskError, match="InternLM2ForCausalLM .* does not support it"):
        eval_cli.run(cli_args(eval_cli, exports["plain"], "--data", test_jsonl, "--attn-implementation", "sdpa"))
