"""Exported models put to use: opened for evaluation (the wrapper, its prompt format, its label space)
and evaluated into one report -- what ``xtuner-vitask eval``, ``ranking-plot``, the demo and the
benchmarks run. The loop itself is :func:`xtuner_vitask.evaluation.evaluate.evaluate_records`, the
one the training-time eval hook runs too."""
import os
import time

from ..errors import VITaskError
from ..logs import quiet_mmengine as quiet_logs  # noqa: F401 (eval, chat, LLaVA exports)
from ..evaluation.evaluate import MODES, evaluate_records, mean_over_tasks, read_records, train_records_beside


def load_model(info, use_ep, verbose=False, attn_implementation="auto"):
    """The export as the project's wrapper (quietly unless ``verbose``); attention resolved per LLM."""
    with quiet_logs(verbose):
        return load_export_model(info, use_ep=use_ep, attn_implementation=attn_implementation)


def load_export_model(info, use_ep=False, torch_dtype="auto", attn_implementation="auto"):
    """The export as the project's wrapper: ``InternVL2`` (plain) or ``VITaskInternVL`` with the
    export's connector and TSM (``use_ep``), frozen, in eval mode. Both sides run the same EP code
    (the export carries a verbatim copy of ``xtuner_vitask/ep``); tests/test_export.py checks their
    logits agree."""
    from ..models.internvl import InternVL2

    common = dict(freeze_llm=True, freeze_visual_encoder=True, llm_lora=None, attn_implementation=attn_implementation,
                  torch_dtype=torch_dtype, activation_checkpointing=False)
    if not use_ep:
        model = InternVL2(info.path, freeze_mlp1=True, **common)
        return model.eval()
    from ..models.vitask import VITaskInternVL

    vitask = info.vitask
    model = VITaskInternVL(info.path, tsm=None, exemplar_dim=int(vitask["exemplar_dim"]), ep_mode=vitask["ep_mode"],
                           **common)
    inner = model.model  # the export's own VITaskInternVLChatModel, TSM attached by its from_pretrained
    model.connector.load_state_dict(inner.connector.state_dict())
    model.connector.to(inner.connector.proj[1].weight.dtype)
    model.tsm = inner.tsm
    model.set_stage(2)  # connector frozen
    model.requires_grad_(False)
    return model.eval()


def export_inputs(info, model, use_ep):
    """The export's prompt format; EP: the TSM's own preprocessing (the export's ``tsm_preprocess``)."""
    from ..evaluation.inputs import ModelInputs

    return ModelInputs.for_model(info.path, tsm_transform=model.model.tsm_preprocess if use_ep else None)


def data_meta(info, data_path):
    """The label space to evaluate in: the export's training meta.json, checked against the data's."""
    from ..export.folder import read_task_meta

    return read_task_meta(info, os.path.join(os.path.dirname(os.path.abspath(data_path)), "meta.json"))


def evaluate_export(model_dir, data_path, use_ep=None, mode="rank", batch_size=8, max_samples=None,
                    max_new_tokens=None, progress=True, model=None, strategy="shared-prefix", verbose=False,
                    attn_implementation="auto"):
    """Score ``model_dir`` (an export folder) on ``data_path``; returns the report dict.

    ``use_ep`` None = EP when the export has a TSM. ``model``: an already loaded wrapper to reuse
    (benchmarks evaluate one model twice). ``strategy``: the ranking strategy
    (:mod:`xtuner_vitask.evaluation.ranking`). The data are checked before the model loads.
    """
    from ..export.folder import inspect_export

    if mode not in MODES:
        raise VITaskError(f"--mode {mode}: use one of {', '.join(MODES)}")
    info = inspect_export(model_dir, need_ep=bool(use_ep))
    use_ep = info.has_ep if use_ep is None else bool(use_ep)
    meta = data_meta(info, data_path)
    records = read_records(data_path, meta, max_samples)
    model = model or load_model(info, use_ep, verbose, attn_implementation)
    inputs = export_inputs(info, model, use_ep)

    report = dict(model=os.path.abspath(model_dir), data=os.path.abspath(data_path), mode=mode, use_ep=use_ep,
                  rank_impl=strategy if mode == "rank" else None, variant="ep" if info.has_ep else "plain",
                  n=len(records))
    return scored_report(report, model, inputs, records, meta, data_path, progress, mode=mode, use_ep=use_ep,
                         batch_size=batch_size, strategy=strategy, max_new_tokens=max_new_tokens,
                         hf_use_ep=use_ep if info.has_ep else None)


def scored_report(report, model, inputs, records, meta, data_path, progress, **evaluate_kwargs):
    """``report`` (what was evaluated) + ``evaluate_records``' per-task results, time and means over tasks:
    the report every export kind (InternVL2, LLaVA) gives."""
    started = time.perf_counter()
    report.update(evaluate_records(model, inputs, records, meta, os.path.dirname(os.path.abspath(data_path)),
                                   train_records=train_records_beside(data_path, meta), progress=progress,
                                   **evaluate_kwargs))
    report["seconds"] = time.perf_counter() - started
    report["samples_per_second"] = len(records) / max(report["seconds"], 1e-9)
    report["unparsable"] = sum(t["unparsable"] for t in report["tasks"].values())
    for key in ("accuracy", "macro_f1"):
        report[key] = mean_over_tasks(report["tasks"], key)
    return report
