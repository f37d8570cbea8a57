"""LLaVA exports put to use: a folder in XTuner's LLaVA layout (``llm_adapter/``, ``projector/``, what
``xtuner chat --llava`` loads), plus VITask's EP parts written beside them by ``VITaskLLaVA.to_hf``
(``connector/``: the exemplar connector and its settings; ``tsm/``: the frozen TSM in timm's layout),
opened as the training wrapper and scored by the one evaluation loop
(:func:`xtuner_vitask.evaluation.evaluate.evaluate_records`).

The LLM and the CLIP tower are not in the export (XTuner's layout keeps frozen towers out): they are
named as ``xtuner chat`` names them (``--llm`` = its positional LLM, ``--visual-encoder``).
"""
import json
import os

from ..errors import VITaskError
from ..evaluation.evaluate import MODES, read_records
from ..evaluation.inputs import ModelInputs
from ..export.llava import CONNECTOR_DIR, SETTINGS_FILE, TSM_DIR
from .exports import quiet_logs, scored_report


def is_llava_export(folder):
    """XTuner's LLaVA layout: a ``projector/`` and the LLM's adapter or weights."""
    return os.path.isdir(os.path.join(folder, "projector"))


def read_settings(export_dir):
    path = os.path.join(export_dir, CONNECTOR_DIR, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_llava_export(export_dir, llm, visual_encoder, use_ep=None, torch_dtype="float32",
                      attn_implementation="auto", verbose=False):
    """The export as the training wrapper: ``VITaskLLaVA`` with its connector and TSM (EP), else ``LLaVA``."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel

    from ..ep.exemplar_tsm import ExemplarTSM
    from ..models.llava import LLaVA, VITaskLLaVA

    if not is_llava_export(export_dir):
        raise VITaskError(f"{export_dir} has no projector/: not a LLaVA export (xtuner convert pth_to_hf CONFIG "
                          "CHECKPOINT OUT with a LLaVA config writes one)")
    for option, path in (("--llm", llm), ("--visual-encoder", visual_encoder)):
        if not path or not os.path.isdir(path):
            raise VITaskError(f"a LLaVA export needs {option} FOLDER (the one its training started from, as "
                              f"`xtuner chat LLM --llava OUT --visual-encoder CLIP` names them); got {path!r}")
    settings = read_settings(export_dir)
    has_ep = settings is not None and os.path.isdir(os.path.join(export_dir, TSM_DIR))
    use_ep = has_ep if use_ep is None else bool(use_ep)
    if use_ep and not has_ep:
        raise VITaskError(f"{export_dir} has no EP parts (connector/ and tsm/): evaluate it with --no-ep, or export "
                          "a VITaskLLaVA checkpoint trained with a TSM")
    common = dict(llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=llm,
                           trust_remote_code=True),
                  visual_encoder=dict(type=CLIPVisionModel.from_pretrained,
                                      pretrained_model_name_or_path=visual_encoder),
                  freeze_llm=True, freeze_visual_encoder=True, torch_dtype=torch_dtype,
                  attn_implementation=attn_implementation, activation_checkpointing=False,
                  projector_depth=(settings or {}).get("projector_depth", 2),
                  visual_select_layer=(settings or {}).get("visual_select_layer", -2))
    with quiet_logs(verbose):
        if use_ep:
            model = VITaskLLaVA(**common, tsm=None, exemplar_dim=settings["exemplar_dim"], ep_mode=settings["ep_mode"])
            model.connector.load_state_dict(load_file(os.path.join(export_dir, CONNECTOR_DIR, "model.safetensors")))
            model.tsm = ExemplarTSM.from_folder(os.path.join(export_dir, TSM_DIR))
        else:
            model = LLaVA(**common)
        adapter = os.path.join(export_dir, "llm_adapter")
        if os.path.isdir(adapter):
            model.llm = PeftModel.from_pretrained(model.llm, adapter)
        projector = AutoModel.from_pretrained(os.path.join(export_dir, "projector"), trust_remote_code=True)
        model.projector.load_state_dict(projector.state_dict())
    return model.eval()


class LLaVAModelInputs(ModelInputs):
    """Prompts, images, TSM pixels and stop ids in XTuner's LLaVA format (``VITaskLLaVADataset``'s tokenization,
    one ``IMAGE_TOKEN_INDEX`` per image feature), for the evaluation loop."""

    @classmethod
    def for_export(cls, llm, visual_encoder, tsm_transform=None, template="internlm2_chat", system=""):
        from ..datasets.llava import LLaVADatasetFormat

        return cls(LLaVADatasetFormat.format_only(llm, visual_encoder, template=template, system=system),
                   tsm_transform)

    @property
    def img_context_id(self):
        from xtuner.utils import IMAGE_TOKEN_INDEX

        return IMAGE_TOKEN_INDEX

    def image_token_str(self, n_tiles):
        return None  # the format writes its own image positions

    def tiles(self, image):
        return self.fmt.transformer(image).unsqueeze(0)  # one "tile": LLaVA's padded-to-square image

    def sequence(self, conversations, n_tiles):
        return self.fmt.get_inputid_labels(list(conversations))

    def prompt_ids(self, conversations, n_tiles):
        conversations = list(conversations)
        if conversations and conversations[-1]["from"] == "human":  # XTuner's map fn builds turns at answers
            conversations.append({"from": "gpt", "value": ""})
        ids, labels = self.fmt.encode(conversations, with_output=False)
        return self.fmt.expand_image_tokens(ids, labels)[0]


def evaluate_llava_export(export_dir, data_path, llm, visual_encoder, use_ep=None, mode="rank", batch_size=8,
                          max_samples=None, progress=True, verbose=False, attn_implementation="auto",
                          template="internlm2_chat", strategy="shared-prefix"):
    """Score a LLaVA export on ``data_path`` by likelihood ranking of the label names (``strategy``: see
    ``evaluation.ranking``); the report of ``inference.exports.evaluate_export``. (Generate mode is
    ``xtuner chat``'s: not here.)"""
    from ..contract import load_meta

    if mode != "rank":
        raise VITaskError(f"--mode {mode}: a LLaVA export is scored by ranking here (one of {', '.join(MODES)} for "
                          "InternVL2 exports); generate answers with `xtuner chat --llava`")
    meta = load_meta(os.path.join(os.path.dirname(os.path.abspath(data_path)), "meta.json"))
    records = read_records(data_path, meta, max_samples)
    model = load_llava_export(export_dir, llm, visual_encoder, use_ep=use_ep, verbose=verbose,
                              attn_implementation=attn_implementation)
    use_ep = hasattr(model, "connector")
    inputs = LLaVAModelInputs.for_export(llm, visual_encoder, model.tsm.preprocess if use_ep else None, template)
    report = dict(model=os.path.abspath(export_dir), data=os.path.abspath(data_path), mode=mode, use_ep=use_ep,
                  rank_impl=strategy, variant="llava-ep" if read_settings(export_dir) else "llava",
                  n=len(records))
    return scored_report(report, model, inputs, records, meta, data_path, progress, mode=mode, use_ep=use_ep,
                         batch_size=batch_size, strategy=strategy)
