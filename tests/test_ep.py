"""xtuner_vitask/ep: the EP code that training runs and every EP export carries verbatim -- splice, spans,
connector, the TSM's one preprocessing, its features and its folder in timm's own layout."""
import ast
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from xtuner_vitask import ep
from xtuner_vitask.ep.exemplar_prompting import ExemplarConnector, exemplar_spans, feature_kind, splice_exemplars
from xtuner_vitask.ep.exemplar_tsm import ExemplarTSM, internvl_tiles_to_tsm, tsm_features, tsm_transform
from xtuner_vitask.errors import VITaskError

TINY = dict(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(patch_size=4, depth=2))
IMG = 9  # the <IMG_CONTEXT> id in these tests


# ----------------------------------------------------------------------------- what the export may import
def test_ep_modules_import_only_torch_timm_pil_and_each_other():
    """The export copies these files beside modeling_vitask.py: nothing of xtuner_vitask may leak in."""
    allowed = {"torch", "timm", "PIL", "contextlib", "json", "os"}
    folder = os.path.dirname(ep.__file__)
    for name in ep.EXPORTED_MODULES:
        tree = ast.parse(open(os.path.join(folder, name + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in ep.EXPORTED_MODULES, (name, node.module)  # flat, relative, exported
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert {m.split(".")[0] for m in modules} <= allowed, (name, modules)


# ----------------------------------------------------------------------------- spans and splice
def test_spans_insert_after_the_image_or_replace_it():
    ids = torch.tensor([[1, IMG, IMG, IMG, 5, 6], [0, 0, 1, IMG, IMG, 5]])  # row 1 left-padded
    assert exemplar_spans(ids, IMG, "cls") == [(4, 4), (5, 5)]
    assert exemplar_spans(ids, IMG, "all") == [(4, 4), (5, 5)]
    assert exemplar_spans(ids, IMG, "rep") == [(1, 4), (3, 5)]
    with pytest.raises(VITaskError, match="a prompt has no image"):
        exemplar_spans(torch.tensor([[1, 2, 3]]), IMG, "cls")
    with pytest.raises(VITaskError, match="ep_mode='mean' is not an EP mode: use one of cls, all, rep"):
        feature_kind("mean")
    assert (feature_kind("cls"), feature_kind("all"), feature_kind("rep")) == ("cls", "all", "all")


def test_splice_inserts_beside_and_replaces_right_padded():
    embeds = torch.arange(2 * 5, dtype=torch.float).reshape(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, 9, -100, -100]])
    tokens = torch.full((2, 2, 1), -1.0)
    e, m, lab, pos = splice_exemplars(embeds, mask, [(2, 2), (1, 1)], tokens, labels=labels)
    assert e[0, :, 0].tolist() == [0, 1, -1, -1, 2, 3, 4]
    assert e[1, :5, 0].tolist() == [5, -1, -1, 6, 7] and m[1].tolist() == [True] * 5 + [False] * 2
    assert m.dtype == torch.bool and lab[0].tolist() == [-100, -100, -100, -100, -100, 7, 8]
    assert lab[1].tolist() == [-100, -100, -100, -100, 9, -100, -100]
    assert pos[0].tolist() == list(range(7)) and pos[1, :5].tolist() == list(range(5))
    # replace (EP_rep): span 1..3 of sample 0 becomes the two tokens
    e, m, lab, _ = splice_exemplars(embeds, mask, [(1, 4), (0, 0)], tokens, labels=labels)
    assert e[0, :4, 0].tolist() == [0, -1, -1, 4] and m[0].sum() == 4 and lab[0].tolist()[:4] == [-100] * 3 + [8]


def test_left_padding_gives_the_same_rows_padded_on_the_left():
    """Generation (the export) splices left-padded prompts: the attended content equals the right-padded one's."""
    torch.manual_seed(0)
    lengths, width = [6, 4], 6
    body = [torch.randn(n, 3) for n in lengths]
    right = torch.zeros(2, width, 3)
    left = torch.zeros(2, width, 3)
    right_mask = torch.zeros(2, width, dtype=torch.long)
    left_mask = torch.zeros(2, width, dtype=torch.long)
    for i, b in enumerate(body):
        right[i, :len(b)], right_mask[i, :len(b)] = b, 1
        left[i, width - len(b):], left_mask[i, width - len(b):] = b, 1
    tokens = torch.randn(2, 3, 3)
    r = splice_exemplars(right, right_mask, [(2, 2), (1, 3)], tokens)
    l_ = splice_exemplars(left, left_mask, [(2, 2), (width - 4 + 1, width - 4 + 3)], tokens, padding_side="left")
    assert r[2] is None and l_[1].dtype == torch.long
    for i in range(2):
        n = int(r[1][i].sum())
        assert torch.equal(r[0][i, :n], l_[0][i, -n:]) and int(l_[1][i].sum()) == n
        assert l_[1][i, :l_[1].shape[1] - n].sum() == 0  # padding on the left only
        assert l_[3][i, -n:].tolist() == list(range(n))  # position ids count the attended tokens
    with pytest.raises(VITaskError, match="outside its 4 attended tokens: the batch is not left-padded"):
        splice_exemplars(left, left_mask, [(2, 2), (1, 1)], tokens, padding_side="left")


def test_connector_maps_features_to_tokens_and_refuses_other_sizes():
    torch.manual_seed(0)
    connector = ExemplarConnector(8, 16)
    assert connector(torch.randn(3, 8)).shape == (3, 1, 16)
    assert connector(torch.randn(3, 5, 8)).shape == (3, 5, 16)
    with pytest.raises(VITaskError, match="exemplar features have size 7 but the connector expects 8"):
        connector(torch.randn(2, 7))


# ----------------------------------------------------------------------------- the TSM's preprocessing and features
def test_tsm_transform_is_the_squashing_bicubic_pipeline():
    """timm's eval transform with crop_mode='squash', crop_pct=1: the whole image, resized bicubic, normalized
    (bit-identical to the torchvision pipeline the TSM was trained with before)."""
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8))  # not square: squashed, not cropped
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    reference = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(mean, std)])(image)
    assert torch.equal(tsm_transform(32, mean, std)(image), reference)
    with pytest.raises(VITaskError, match="img_size must be a positive"):
        tsm_transform(0, mean, std)


def _smooth_image(size=28, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BILINEAR)


def test_tsm_pixels_from_internvl_tiles_are_close_to_its_own_preprocessing():
    """model.chat(...) without tsm_pixel_values derives the TSM input from InternVL's tile: a stated distance
    from the TSM's own preprocessing of the same image (both in the TSM's normalized units)."""
    from torchvision import transforms as T

    image = _smooth_image()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tile = T.Compose([T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(*imagenet)])(image)  # what InternVL's build_transform makes of it
    own = tsm_transform(32, (0.5,) * 3, (0.5,) * 3)(image)
    derived = internvl_tiles_to_tsm(tile[None], 32, (0.5,) * 3, (0.5,) * 3)[0]
    assert derived.shape == own.shape
    # measured: mean 0.0024-0.0026, max 0.010-0.012 (one 8-bit step is 0.0078 here)
    assert (derived - own).abs().mean() < 0.01 and (derived - own).abs().max() < 0.05


def tiny_tsm_model(num_classes=4, **kw):
    from xtuner_vitask.tsm.model import TaskSpecificModel

    torch.manual_seed(0)
    return TaskSpecificModel(num_classes=num_classes, **dict(TINY, **kw)).freeze()


def test_tsm_folder_is_timms_own_layout_and_round_trips(tmp_path):
    import timm
    from timm.data import resolve_model_data_config

    tsm = tiny_tsm_model(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    folder = tmp_path / "tsm"
    ExemplarTSM(tsm.backbone, tsm.img_size, tsm.mean, tsm.std, info={"sha256": "ab" * 32}).save(str(folder))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["vitask_tsm"] == {"sha256": "ab" * 32}
    # timm alone loads it, with the preprocessing in its pretrained_cfg
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = resolve_model_data_config(plain)
    assert (data["input_size"], data["mean"], data["std"]) == ((3, 32, 32), [0.5, 0.4, 0.3], [0.2] * 3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(plain(x), tsm(x, mode="tensor"))
    loaded = ExemplarTSM.from_folder(str(folder))
    assert loaded.feature_dim == tsm.feature_dim == 192 and not loaded.training
    for kind in ("cls", "all"):
        assert torch.equal(loaded.extract_features(x, kind), tsm.extract_features(x, kind))
    image = _smooth_image()
    assert torch.equal(loaded.preprocess(image), tsm_transform(32, tsm.mean, tsm.std)(image))
    assert torch.equal(loaded.preprocess(image.convert("L")), tsm_transform(32, tsm.mean, tsm.std)(
        image.convert("L").convert("RGB")))
    with pytest.raises(VITaskError, match=r"TSM images must be \(B, 3, 32, 32\)"):
        loaded.extract_features(torch.randn(1, 3, 28, 28))


def test_an_old_home_made_tsm_folder_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "xtuner_vitask.tsm/1", "model_name": "x"}))
    with pytest.raises(VITaskError, match="not in timm's folder layout .*re-export the model"):
        ExemplarTSM.from_folder(str(tmp_path))


def test_cnn_features_flatten_the_map():
    model = tiny_tsm_model(3, model_name="resnet18", img_size=64, model_kwargs={})
    x = torch.randn(2, 3, 64, 64)
    assert tsm_features(model.backbone, x, "cls").shape == (2, 512)
    assert tsm_features(model.backbone, x, "all").shape == (2, 4, 512)
