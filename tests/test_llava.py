"""VITask on XTuner's LLaVA: the tiny LLaVA, the adapter against XTuner's own sequence building, the method
shared with InternVL2, and (slow) both stages through XTuner's train tool, XTuner's pth_to_hf export and
XTuner's own `xtuner chat --llava` answering with the image exactly as the trained model decodes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_train

IMAGE_TOKEN_INDEX = -200


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Written by the CLI (`xtuner-vitask make-tiny --llava`), as a user would."""
    import argparse

    from xtuner_vitask.cli import make_tiny

    out = tmp_path_factory.mktemp("llava") / "tiny_llava"
    parser = argparse.ArgumentParser()
    make_tiny.add_arguments(parser)
    assert make_tiny.run(parser.parse_args([str(out), "--llava"])) == 0
    return str(out)


def _model(tiny, tsm=None, **kwargs):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from xtuner_vitask.models.llava import VITaskLLaVA

    return VITaskLLaVA(
        llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=f"{tiny}/llm",
                 trust_remote_code=True),
        visual_encoder=dict(type=CLIPVisionModel.from_pretrained,
                            pretrained_model_name_or_path=f"{tiny}/visual_encoder"),
        freeze_llm=True, pretrained_pth=f"{tiny}/projector_pretrain.pth", torch_dtype="float32",
        activation_checkpointing=False, tsm=tsm, exemplar_dim=None if tsm else 24,
        llm_lora=dict(type=LoraConfig, r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules="auto",
                      modules_to_save="auto"), **kwargs)


def _dataset(tiny, data, tsm_checkpoint=None, **kwargs):
    from xtuner_vitask.datasets.llava import VITaskLLaVADataset

    options = dict(tsm_checkpoint=tsm_checkpoint) if tsm_checkpoint else dict(tsm_img_size=32)
    options.update(visual_encoder_path=f"{tiny}/visual_encoder", max_length=512)
    options.update(kwargs)
    return VITaskLLaVADataset(f"{tiny}/llm", f"{data}/train.jsonl", **options)


def test_tiny_llava_has_xtuners_three_inputs(tiny_llava):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig

    names = sorted(os.listdir(tiny_llava))
    assert names == ["README.md", "llm", "projector_pretrain.pth", "visual_encoder"]
    tokenizer = AutoTokenizer.from_pretrained(f"{tiny_llava}/llm", trust_remote_code=True)
    for token in ("<|im_start|>", "<|im_end|>"):  # internlm2_chat's template tokens are whole tokens
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.encode("a", add_special_tokens=True)[0] == tokenizer.bos_token_id
    processor = CLIPImageProcessor.from_pretrained(f"{tiny_llava}/visual_encoder")
    vision = CLIPVisionConfig.from_pretrained(f"{tiny_llava}/visual_encoder")
    assert processor.crop_size == {"height": vision.image_size, "width": vision.image_size}
    state = torch.load(f"{tiny_llava}/projector_pretrain.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("projector.model.") for k in state)


def test_llava_sequence_is_xtuners_and_the_method_is_shared(tiny_llava, derma_data):
    """The adapter's embeddings equal XTuner's prepare_inputs_labels_for_multimodal on XTuner's one-placeholder
    sequence (so training sees what `xtuner chat` builds), and VITask's code is the one InternVL2 runs."""
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    from xtuner_vitask.datasets import vitask_collate_fn
    from xtuner_vitask.models.llava import VITaskLLaVA
    from xtuner_vitask.models.vitask import VITask, VITaskInternVL

    for name in ("compute_losses", "exemplar_tokens", "exemplar_spans", "set_stage", "parse_losses", "state_dict"):
        assert getattr(VITaskLLaVA, name) is getattr(VITaskInternVL, name) is getattr(VITask, name), name

    torch.manual_seed(0)
    ds = _dataset(tiny_llava, derma_data)
    model = _model(tiny_llava).eval()
    item = ds[0]
    ids, labels = ds.encode(ds.data[0]["conversations"])  # XTuner's own: one IMAGE_TOKEN_INDEX
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and item["input_ids"].count(IMAGE_TOKEN_INDEX) == ds.patch_token == 16
    with torch.no_grad():
        features = model.encode_images(item["pixel_values"])
        ours = model.embed_tokens(torch.tensor([item["input_ids"]]), features)
        xtuner = prepare_inputs_labels_for_multimodal(llm=model.llm, input_ids=torch.tensor([ids]),
                                                      labels=torch.tensor([labels]), pixel_values=features)
    assert torch.equal(ours, xtuner["inputs_embeds"])
    assert xtuner["labels"][0].tolist() == item["labels"]

    batch = vitask_collate_fn([ds[i] for i in range(4)])["data"]
    batch["exemplars"] = torch.randn(4, 24)
    terms = model.compute_losses(batch)
    assert list(terms) == ["loss_van", "loss_ep", "loss_rda"] and all(torch.isfinite(v) for v in terms.values())
    model.parse_losses(terms)[0].backward()
    assert model.connector.proj[1].weight.grad.abs().sum() > 0  # stage 1: the connector learns
    assert model.projector.model[0].weight.grad.abs().sum() > 0  # XTuner's finetune trains the projector
    assert all(p.grad is None for p in model.visual_encoder.parameters())  # the tower is frozen
    model.zero_grad(set_to_none=True)
    model.set_stage(2)
    terms = model.compute_losses(batch)
    assert list(terms) == ["loss_van", "loss_ep", "loss_rda", "loss_crt"]
    model.parse_losses(terms)[0].backward()
    assert all(p.grad is None for p in model.connector.parameters())  # stage 2: frozen
    saved = {k.split(".")[0] for k in model.state_dict()}
    assert saved == {"llm", "projector", "connector"}


def test_shared_prefix_passes_equal_full_passes_on_llava(tiny_llava, derma_data):
    """The shared-prefix step (models/shared_prefix.py) on the LLaVA adapter: same losses and gradients as full
    passes, with the projector trained (its graph is shared by every pass) and frozen."""
    from unittest import mock

    from xtuner_vitask.datasets import vitask_collate_fn
    from xtuner_vitask.models import vitask

    ds = _dataset(tiny_llava, derma_data, negatives=True)
    batch = vitask_collate_fn([ds[i] for i in range(4)])["data"]
    batch["exemplars"] = torch.randn(4, 24, generator=torch.Generator().manual_seed(0))
    for freeze_projector in (False, True):
        results = []
        for shared in (True, False):
            torch.manual_seed(0)
            model = _model(tiny_llava, shared_prefix=shared, freeze_projector=freeze_projector)
            model.set_stage(2)
            with mock.patch.object(vitask, "shared_prefix_terms", wraps=vitask.shared_prefix_terms) as spy:
                terms = model.compute_losses(batch)
            assert spy.called == shared  # the shared-prefix step ran, not its full-pass fallback
            model.parse_losses(terms)[0].backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append(({k: float(v) for k, v in terms.items()}, grads))
        (shared_terms, shared_grads), (full_terms, full_grads) = results
        assert list(shared_terms) == ["loss_van", "loss_ep", "loss_rda", "loss_crt"]
        for name in full_terms:
            assert shared_terms[name] == pytest.approx(full_terms[name], abs=1e-5), (freeze_projector, name)
        assert shared_grads.keys() == full_grads.keys()
        assert any("projector" in n for n in full_grads) != freeze_projector
        for name in full_grads:
            torch.testing.assert_close(shared_grads[name], full_grads[name], atol=1e-5, rtol=1e-4)


def test_bad_llava_inputs_are_one_clear_error(tiny_llava, derma_data, tmp_path):
    from xtuner_vitask.errors import VITaskError

    with pytest.raises(VITaskError, match="visual_encoder_path"):
        _dataset(tiny_llava, derma_data, visual_encoder_path=None)
    with pytest.raises(VITaskError, match="does not exist"):
        _dataset(tiny_llava, derma_data, visual_encoder_path=str(tmp_path / "none"))
    with pytest.raises(VITaskError, match="flash_attention_2"):
        _model(tiny_llava, attn_implementation="flash_attention_2")
    with pytest.raises(VITaskError, match="ep_mode"):
        _model(tiny_llava, ep_mode="middle")

    from xtuner_vitask.inference.llava import evaluate_llava_export, load_llava_export

    export = tmp_path / "export"
    (export / "projector").mkdir(parents=True)
    with pytest.raises(VITaskError, match="--llm FOLDER"):
        load_llava_export(str(export), None, f"{tiny_llava}/visual_encoder")
    with pytest.raises(VITaskError, match="no EP parts"):
        load_llava_export(str(export), f"{tiny_llava}/llm", f"{tiny_llava}/visual_encoder", use_ep=True)
    with pytest.raises(VITaskError, match="xtuner chat --llava"):
        evaluate_llava_export(str(export), f"{derma_data}/test.jsonl", f"{tiny_llava}/llm",
                              f"{tiny_llava}/visual_encoder", mode="generate")
    with pytest.raises(VITaskError, match="not a LLaVA export"):
        load_llava_export(str(tmp_path), f"{tiny_llava}/llm", f"{tiny_llava}/visual_encoder")


@pytest.mark.parametrize("size", ["1_8b", "7b"])
def test_llava_configs_carry_xtuners_finetune_settings(size):
    """The shipped configs: XTuner's LLaVA LoRA finetune settings, every path at the named LLM, a valid schedule."""
    import math

    from mmengine.config import Config

    from test_configs import _lr_curve
    from xtuner_vitask.data.medmnist import dataset_info

    cfg = Config.fromfile(REPO / f"configs/vitask_llava_internlm2_chat_{size}_clip_vit_large_p14_336_derma.py")
    llm = f"internlm/internlm2-chat-{size}"
    assert cfg.model.llm.pretrained_model_name_or_path == cfg.tokenizer.pretrained_model_name_or_path == llm
    assert cfg.train_dataloader.dataset.model_path == llm and f"chat_{size}_clip" in cfg.model.pretrained_pth
    assert (cfg.model.llm_lora.r, cfg.model.llm_lora.lora_alpha, cfg.optim_wrapper.optimizer.lr) == (512, 256, 2e-4)
    assert cfg.optim_wrapper.optimizer.weight_decay == 0 and cfg.train_dataloader.batch_size == 16
    assert cfg.model.freeze_visual_encoder and not cfg.model.get("freeze_projector", False)
    assert cfg.train_dataloader.dataset.template.INSTRUCTION.startswith("<|im_start|>user")
    assert cfg.model.tsm.meta == "data/dermamnist_224/meta.json" == cfg.data_root + "meta.json"
    iters = math.ceil(dataset_info("dermamnist")["n_samples"]["train"] / cfg.train_dataloader.batch_size)
    lr, (warmup, cosine), curve = _lr_curve(cfg, iters)
    assert warmup.end >= 2 and cosine.end == len(curve) == 2 * iters and max(curve) == pytest.approx(lr)


# ---- end to end (slow) --------------------------------------------------------------------------------
def llava_options(tiny, data, tsm_checkpoint, *extra):
    """--cfg-options that point configs/vitask_llava_tiny_cpu.py at the fixtures."""
    return (f"model.llm.pretrained_model_name_or_path={tiny}/llm",
            f"model.visual_encoder.pretrained_model_name_or_path={tiny}/visual_encoder",
            f"model.pretrained_pth={tiny}/projector_pretrain.pth",
            f"tokenizer.pretrained_model_name_or_path={tiny}/llm",
            f"image_processor.pretrained_model_name_or_path={tiny}/visual_encoder",
            f"train_dataloader.dataset.model_path={tiny}/llm",
            f"train_dataloader.dataset.visual_encoder_path={tiny}/visual_encoder",
            f"train_dataloader.dataset.data_paths={data}/train.jsonl", f"model.tsm.meta={data}/meta.json",
            f"model.tsm.checkpoint={tsm_checkpoint}", f"train_dataloader.dataset.tsm_checkpoint={tsm_checkpoint}",
            *extra)


def scalars(work_dir):
    """Per-iteration training scalars that mmengine's LocalVisBackend wrote."""
    import glob

    (path,) = glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))
    rows = [json.loads(line) for line in open(path)]
    return {row["iter"]: row for row in rows if "loss" in row}


def _greedy_answer(model, ds, conversations, image_path, max_new_tokens):
    """The trained model's greedy answer to one instruction and image (full passes; the tiny is cheap)."""
    from xtuner_vitask.data.images import read_image

    ids, _ = ds.encode(conversations, with_output=False)  # ends at "<|im_start|>assistant\n"
    ids, _ = ds.expand_image_tokens(ids, ids)
    stop = ds.tokenizer.convert_tokens_to_ids("<|im_end|>")
    decoder, head = model.decoder_and_head()
    with torch.no_grad():
        features = model.encode_images(ds.transformer(read_image(image_path)).unsqueeze(0))
        new = []
        for _ in range(max_new_tokens):
            tokens = torch.tensor([ids + new])
            embeds = model.embed_tokens(tokens, features)
            hidden = decoder(inputs_embeds=embeds, use_cache=False, return_dict=True).last_hidden_state
            new.append(int(head(hidden[:, -1]).argmax(-1)))
            if new[-1] in (stop, ds.tokenizer.eos_token_id):
                break
    return ds.tokenizer.decode(new)


@pytest.mark.slow
def test_llava_trains_both_stages_exports_and_xtuner_chat_answers(tmp_path, tiny_llava, derma_data, tiny_tsm):
    from mmengine.config import Config
    from xtuner.model.utils import guess_load_checkpoint
    from xtuner.registry import BUILDER

    work = tmp_path / "work"
    proc = run_train("configs/vitask_llava_tiny_cpu.py", work, *llava_options(tiny_llava, derma_data, tiny_tsm))
    log = proc.stdout + proc.stderr
    assert "VITask stage 2 from iteration 12" in log
    rows = scalars(work)
    assert sorted(rows) == list(range(1, 25))
    assert {"loss_van", "loss_ep", "loss_rda"} <= set(rows[1]) and "loss_crt" not in rows[12]
    assert "loss_crt" in rows[13]
    assert rows[24]["loss_van"] < rows[1]["loss_van"] - 1.0  # it learns the answers
    state = torch.load(work / "iter_24.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"llm", "projector", "connector"}

    # XTuner's own converter writes XTuner's LLaVA layout (frozen tower: none; LoRA: llm_adapter/)
    out = tmp_path / "export"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    convert = subprocess.run([sys.executable, "-m", "xtuner.tools.model_converters.pth_to_hf",
                              str(work / "vitask_llava_tiny_cpu.py"), str(work / "iter_24.pth"), str(out), "--fp32"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-3000:]
    # + VITask's EP parts beside them (connector/, tsm/), which xtuner chat ignores
    assert sorted(os.listdir(out)) == ["connector", "llm_adapter", "projector", "tsm", "xtuner_config.py"]

    # XTuner's own chat tool, driven through stdin, answers with the image ...
    record = json.loads(open(f"{derma_data}/train.jsonl").readline())
    image = os.path.join(derma_data, record["image"])
    instruction = record["conversations"][0]["value"].replace("<image>", "").strip()
    chat = subprocess.run(
        [sys.executable, "-m", "xtuner.tools.chat", f"{tiny_llava}/llm", "--llava", str(out), "--visual-encoder",
         f"{tiny_llava}/visual_encoder", "--image", image, "--prompt-template", "internlm2_chat", "--torch-dtype",
         "fp32", "--no-streamer", "--max-new-tokens", "16", "--temperature", "0"],  # greedy (its default samples)
        input=f"{instruction}\n\nEXIT\n\n", cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert f"Load LLM adapter from {out}" in chat.stdout and f"Load projector from {out}" in chat.stdout
    answer = chat.stdout.split(">>> ")[1].split("\ndouble enter")[0].split("\nRemove the memory")[0]

    # ... exactly what the trained model (built from the run's config, as pth_to_hf does) decodes greedily
    cfg = Config.fromfile(work / "vitask_llava_tiny_cpu.py")
    model = BUILDER.build(cfg.model).eval()
    model.load_state_dict(guess_load_checkpoint(str(work / "iter_24.pth")), strict=False)
    ds = _dataset(tiny_llava, derma_data, tsm_checkpoint=tiny_tsm)
    expected = _greedy_answer(model, ds, record["conversations"], image, 16)
    assert answer.strip() == expected.strip() and expected.strip()

    # `xtuner-vitask eval` scores the export with EP: the trained model's own scores
    evaluated = subprocess.run(
        [sys.executable, "-m", "xtuner_vitask.cli.main", "eval", str(out), "--data", f"{derma_data}/test.jsonl",
         "--llm", f"{tiny_llava}/llm", "--visual-encoder", f"{tiny_llava}/visual_encoder", "--ep", "--max-samples", "8",
         "--out", str(tmp_path / "eval"), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["use_ep"] and report["n"] == 8 and report["variant"] == "llava-ep"

    from xtuner_vitask.contract import load_meta
    from xtuner_vitask.evaluation.evaluate import read_records
    from xtuner_vitask.evaluation.ranking import candidate_responses, rank_records
    from xtuner_vitask.inference.llava import LLaVAModelInputs

    meta = load_meta(f"{derma_data}/meta.json")
    records = read_records(f"{derma_data}/test.jsonl", meta, 8)
    inputs = LLaVAModelInputs(ds, ds.tsm_transform)
    candidates = candidate_responses(meta.task())
    scores = {ep: rank_records(model, inputs, records, derma_data, candidates, use_ep=ep, strategy="full-sequence",
                               progress=False) for ep in (True, False)}
    assert (scores[True] - scores[False]).abs().max() > 1e-4  # EP changes the scores: the connector matters
    probabilities = torch.softmax(scores[True], dim=1)
    for sample, expected_p in zip(report["samples"], probabilities):
        torch.testing.assert_close(torch.tensor(sample["probabilities"]), expected_p, atol=2e-5, rtol=0)
