"""Issue 13, data and training: each hostile input gives one message naming the thing and the fix, a
non-zero exit, no traceback, and nothing half-written or deleted."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xtuner_vitask.data import convert_external, convert_medmnist
from xtuner_vitask.data.images import probe_image, read_image, rescale_to_8bit
from xtuner_vitask.data.npz import npz_filename
from xtuner_vitask.errors import VITaskError
from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::xtuner_vitask.data.npz.SplitSizeWarning")


@pytest.fixture(scope="module")
def npz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    for flag in ("pneumoniamnist", "retinamnist"):
        write_medmnist_npz(root / npz_filename(flag, 28), flag, (40, 10, 10), seed=1)
    return root


def entries(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ------------------------------------------------------------------------------------- --force
def test_force_replaces_only_a_converted_set(npz_root, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(VITaskError, match="thesis is not a set written by data_tools .* --force only replaces"):
        convert_medmnist("pneumoniamnist", 28, mine, root=npz_root, force=True, progress=False)
    assert entries(mine) == ["chapter1.tex"] and entries(tmp_path) == ["thesis"]

    converted = convert_medmnist("pneumoniamnist", 28, tmp_path / "set", root=npz_root, progress=False)
    (converted / "notes.txt").write_text("mine")
    with pytest.raises(VITaskError, match="holds files a converter does not write \\(notes.txt\\)"):
        convert_medmnist("pneumoniamnist", 28, converted, root=npz_root, force=True, progress=False)
    assert (converted / "notes.txt").read_text() == "mine" and (converted / "train.jsonl").is_file()

    (tmp_path / "file").write_text("x")
    with pytest.raises(VITaskError, match="exists and is not a folder"):
        convert_medmnist("pneumoniamnist", 28, tmp_path / "file", root=npz_root, force=True, progress=False)
    (converted / "notes.txt").unlink()
    convert_medmnist("pneumoniamnist", 28, converted, root=npz_root, force=True, limit_per_split=3, progress=False)
    assert len((converted / "train.jsonl").read_text().splitlines()) == 3
    assert sorted(entries(tmp_path)) == ["file", "set", "thesis"]


# --------------------------------------------------------------------- interrupted conversions
def test_rerun_removes_temporaries_of_dead_runs_only(npz_root, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    stale = tmp_path / f"out.tmp-{host}-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f"out.tmp-{host}-{os.getpid()}-efgh5678"
    foreign = tmp_path / "out.tmp-user-made"
    for folder in (stale, live, foreign):
        (folder / "images").mkdir(parents=True)
    convert_medmnist("pneumoniamnist", 28, tmp_path / "out", root=npz_root, limit_per_split=2, progress=False)
    assert entries(tmp_path) == sorted(["out", live.name, foreign.name])


@pytest.fixture(scope="module")
def big_npz(tmp_path_factory):
    """Enough 224 px noise images (slow to encode as PNG) that a conversion runs for seconds, time to
    interrupt it; written uncompressed in medmnist's layout, which is quicker than generating a set."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 400), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(n, 1).astype(np.uint8)
    path = tmp_path_factory.mktemp("big") / "dermamnist_224.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("how, code, line", [("SIGTERM", 143, "terminated (SIGTERM)"), ("Ctrl-C", 130, "interrupted")])
def test_interrupted_conversion_leaves_nothing(big_npz, tmp_path, how, code, line):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "data_tools" / "medmnist_to_xtuner.py"), "--flag", "dermamnist", "--size",
           "224", "--npz", str(big_npz), "--out", str(out), "--workers", "2"]
    # own process group with SIGINT at its default, as a terminal's foreground job
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob("out.tmp-*/images/train/*.png")) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    if how == "SIGTERM":
        proc.terminate()  # the main process only; its workers are ended by it
    else:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group, workers included
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert line in err and "Traceback" not in err
    assert entries(tmp_path) == []


# ---------------------------------------------------------------------------- corrupted npz
def _corrupt_member(path, member, offset_fraction=0.5):
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra))
        start = handle.tell()
        position = start + int(info.compress_size * offset_fraction)
        handle.seek(position)
        data = handle.read(64)
        handle.seek(position)
        handle.write(bytes(b ^ 0x5A for b in data))


@pytest.mark.parametrize("compressed", [True, False])
def test_npz_with_a_corrupted_member(npz_root, tmp_path, compressed):
    arrays = dict(np.load(npz_root / npz_filename("pneumoniamnist", 28)))
    path = tmp_path / npz_filename("pneumoniamnist", 28)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    _corrupt_member(path, "train_images.npy")
    with pytest.raises(VITaskError, match="the 'train_images' array is corrupted .*re-download the file") as err:
        convert_medmnist("pneumoniamnist", 28, tmp_path / "out", npz_path=path, progress=False)
    assert "\n" not in str(err.value)
    assert entries(tmp_path) == [path.name]


# ------------------------------------------------------------------------------ 16-bit images
GRADIENT = np.tile(np.linspace(1000, 4000, 64), (64, 1))  # a 12-bit image: 1000..4000 of 0..65535


@pytest.mark.parametrize("kind", ["png16", "tiff16", "tiff16b", "tiff32", "float", "float_nan"])
def test_wide_images_are_rescaled_by_min_max(tmp_path, kind):
    if kind == "png16":
        image, name = Image.fromarray(GRADIENT.astype(np.uint16)), "g.png"
    elif kind == "tiff16":
        image, name = Image.fromarray(GRADIENT.astype(np.uint16)), "g.tif"
    elif kind == "tiff16b":
        image, name = Image.frombytes("I;16B", (64, 64), GRADIENT.astype(">u2").tobytes()), "g.tif"
    elif kind == "tiff32":
        image, name = Image.fromarray(GRADIENT.astype(np.int32)), "g.tif"
    else:
        values = GRADIENT.astype(np.float32) / 4000 - 0.25  # float, partly negative
        if kind == "float_nan":
            values[0, 0] = np.nan
        image, name = Image.fromarray(values), "g.tif"
    image.save(tmp_path / name)
    with Image.open(tmp_path / name) as opened:
        assert opened.mode not in ("L", "RGB")  # really a wide image on disk
        clipped = np.asarray(opened.convert("L"))  # what Pillow alone gives
    gray = np.asarray(read_image(tmp_path / name, "L"))
    rgb = np.asarray(read_image(tmp_path / name, "RGB"))
    row = gray[1]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) >= 0)
    assert len(np.unique(row)) > 60  # 64 distinct values keep (almost) all their steps
    assert len(np.unique(clipped[1])) <= 2  # Pillow's own conversion: binary or flat
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], gray)
    if kind == "float_nan":
        assert gray[0, 0] == 0


def test_constant_and_non_finite_arrays():
    assert rescale_to_8bit(np.full((3, 3), 7.0)).max() == 0
    assert rescale_to_8bit(np.full((2, 2), np.nan)).max() == 0
    assert rescale_to_8bit(np.array([[0, 1, np.inf]])).tolist() == [[0, 255, 0]]


def test_alpha_palette_and_grayscale(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(read_image(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [0, 0, 0]  # transparent -> black
    palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    palette.save(tmp_path / "p.png")
    assert np.asarray(read_image(tmp_path / "p.png"))[0, 1].tolist() == [1, 254, 0]
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "l.png")
    assert np.asarray(read_image(tmp_path / "l.png"))[0, 0].tolist() == [9, 9, 9]
    assert probe_image(tmp_path / "l.png") == (4, 4)


def test_external_converter_keeps_16_bit_information(npz_root, tmp_path):
    retina = convert_medmnist("retinamnist", 28, tmp_path / "retina", root=npz_root, limit_per_split=2,
                              progress=False)
    images = tmp_path / "ext"
    images.mkdir()
    Image.fromarray(GRADIENT.astype(np.uint16)).save(images / "x16.png")
    Image.fromarray((GRADIENT / 4000).astype(np.float32)).save(images / "xf.tif")
    (tmp_path / "labels.csv").write_text("image,label\nx16.png,0\nxf.tif,1\n")
    out = convert_external(images, tmp_path / "labels.csv", retina, tmp_path / "out", size=0, progress=False)
    for index in range(2):
        written = np.asarray(Image.open(out / "images" / "test" / f"{index:05d}.png").convert("L"))
        assert written.min() == 0 and written.max() == 255 and len(np.unique(written)) > 60


# ------------------------------------------------------------------------ training data sets
def _copy_set(src, dst, edit=None, keep_images=True):
    """A copy of a converted set (images linked), its train.jsonl lines passed through ``edit``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    shutil.copy(src / "meta.json", dst / "meta.json")
    if keep_images:
        os.symlink(src / "images", dst / "images")
    lines = (src / "train.jsonl").read_text().splitlines()
    (dst / "train.jsonl").write_text("\n".join(edit(lines) if edit else lines) + "\n")
    return str(dst / "train.jsonl")


def _set_field(lines, n, **fields):
    record = json.loads(lines[n])
    for key, value in fields.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    lines[n] = json.dumps(record)
    return lines


def _human(lines, n, text):
    record = json.loads(lines[n])
    record["conversations"][0]["value"] = text
    lines[n] = json.dumps(record)
    return lines


def vanilla(tiny_model, path, **kwargs):
    from xtuner_vitask.datasets import InternVL2Dataset

    return InternVL2Dataset(tiny_model, path, dynamic_image_size=False, max_length=512, **kwargs)


def vitask(tiny_model, path, **kwargs):
    from xtuner_vitask.datasets import VITaskDataset

    return VITaskDataset(tiny_model, path, tsm_img_size=32, max_length=512, **kwargs)


def test_every_bad_record_is_reported_at_once(tiny_model, derma_data, tmp_path):
    def edit(lines):
        lines[1] = '{"id": "broken", '  # not JSON
        _human(lines, 3, "<image>\n<image>\nTwo images?")
        _set_field(lines, 5, image="images/train/nope.png")
        _set_field(lines, 7, label=[7])
        _set_field(lines, 9, label=[-1])
        lines[11] = "[1, 2]"
        return lines

    for build in (vanilla, vitask):
        with pytest.raises(VITaskError) as err:
            build(tiny_model, _copy_set(derma_data, tmp_path / build.__name__, edit))
        text = str(err.value)
        assert text.startswith("6 of 96 records in ") and "cannot be used" in text
        for fragment in ("line 2: not JSON", "line 4: has 2 '<image>'", "line 6: image does not exist",
                         "nope.png", "line 8: label 7 is outside dermamnist's classes 0..6",
                         "line 10: label -1 is outside", "line 12: a JSON list, not an object"):
            assert fragment in text, (fragment, text)


def test_empty_and_missing_training_files(tiny_model, derma_data, tmp_path):
    with pytest.raises(VITaskError, match="train.jsonl has no records"):
        vanilla(tiny_model, _copy_set(derma_data, tmp_path / "empty", lambda lines: []))
    with pytest.raises(VITaskError, match="is a folder: pass one of its JSONL files"):
        vanilla(tiny_model, derma_data)


def test_record_without_image(tiny_model, derma_data, tmp_path):
    path = _copy_set(derma_data, tmp_path / "noimage", lambda lines: _set_field(lines, 2, image=None))
    with pytest.raises(VITaskError, match="line 3: has no 'image': every record needs one here"):
        vitask(tiny_model, path)
    with pytest.raises(VITaskError, match="line 3: has '<image>' but no 'image'"):
        vanilla(tiny_model, path)
    # vanilla XTuner trains text-only records; without <image> they are accepted
    text_only = _copy_set(derma_data, tmp_path / "text", lambda lines: _human(_set_field(lines, 2, image=None), 2, "Hi"))
    assert len(vanilla(tiny_model, text_only)) == 96
    # unchecked (validate=False), VITask still never reuses the previous sample's image for the TSM
    dataset = vitask(tiny_model, path, validate=False, negatives=False)
    dataset[1]
    with pytest.raises(VITaskError, match="has no image"):
        dataset[2]


def test_all_images_missing_is_one_capped_report(tiny_model, derma_data, tmp_path):
    with pytest.raises(VITaskError) as err:
        vitask(tiny_model, _copy_set(derma_data, tmp_path / "gone", keep_images=False))
    lines = str(err.value).splitlines()
    assert lines[0].startswith("96 of 96 records") and len(lines) == 22 and lines[-1] == "  ... and 76 more"
    assert all("cannot read image (FileNotFoundError" in line or "does not exist" in line for line in lines[1:21])


def test_corrupt_image_files(tiny_model, derma_data, tmp_path):
    path = _copy_set(derma_data, tmp_path / "corrupt", keep_images=False)
    shutil.copytree(Path(derma_data) / "images", tmp_path / "corrupt" / "images")
    first = tmp_path / "corrupt" / "images" / "train" / "00000.png"
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # truncated PNG
    (tmp_path / "corrupt" / "images" / "train" / "00001.png").write_text("not an image")
    with pytest.raises(VITaskError) as err:
        vanilla(tiny_model, path)
    text = str(err.value)
    assert text.startswith("2 of 96 records") and "line 1: cannot read image" in text and "line 2:" in text


def test_max_length_too_short(tiny_model, derma_data, tmp_path):
    from xtuner_vitask.datasets import InternVL2Dataset

    path = _copy_set(derma_data, tmp_path / "long", lambda lines: lines[:1])
    ok = InternVL2Dataset(tiny_model, path, dynamic_image_size=False, max_length=4096)
    sample = ok.prepare_data(0)
    need = len(sample["input_ids"])  # the untruncated sample, as XTuner builds it
    image_end = sample["input_ids"].index(ok.tokenizer.convert_tokens_to_ids(ok.IMG_END_TOKEN)) + 1
    assert InternVL2Dataset(tiny_model, path, dynamic_image_size=False, max_length=need)  # fits exactly
    with pytest.raises(VITaskError, match=f"line 1: {need} tokens, max_length={need - 1} would cut the response: "
                                          f"raise max_length to at least {need}"):
        InternVL2Dataset(tiny_model, path, dynamic_image_size=False, max_length=need - 1)
    with pytest.raises(VITaskError, match="line 1: .* max_length=.* would cut the image tokens"):
        InternVL2Dataset(tiny_model, path, dynamic_image_size=False, max_length=image_end - 1)


def test_image_gone_after_the_check_stops_instead_of_substituting(tiny_model, derma_data, tmp_path, capsys):
    path = _copy_set(derma_data, tmp_path / "later", keep_images=False)
    shutil.copytree(Path(derma_data) / "images", tmp_path / "later" / "images")
    dataset = vitask(tiny_model, path, negatives=False)
    (tmp_path / "later" / "images" / "train" / "00004.png").unlink()
    with pytest.raises(VITaskError, match="line 5: image .*00004.png does not exist.*readable when training started"):
        dataset[4]
    assert "Error:" not in capsys.readouterr().out  # XTuner's substitute-a-random-sample path is not taken


def test_uncaught_vitask_error_prints_one_message():
    code = ("from xtuner_vitask.errors import VITaskError, install_excepthook\ninstall_excepthook()\n"
            "raise VITaskError('2 of 9 records in t.jsonl cannot be used:\\n  line 3: x')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "error: 2 of 9 records in t.jsonl cannot be used:\n  line 3: x\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, VITASK_TRACEBACK="1"))
    assert "Traceback" in proc.stderr


@pytest.mark.slow
def test_train_tool_refuses_bad_data_before_the_first_step(tiny_model, derma_data, tmp_path):
    from conftest import run_train

    path = _copy_set(derma_data, tmp_path / "data", lambda lines: _set_field(lines, 0, label=[9]))
    proc = run_train("configs/internvl2_tiny_cpu_lora.py", tmp_path / "work", f"model.model_path={tiny_model}",
                     f"train_dataloader.dataset.model_path={tiny_model}",
                     f"train_dataloader.dataset.data_paths={path}", check=False)
    assert proc.returncode != 0
    assert "error: 1 of 96 records" in proc.stderr and "line 1: label 9 is outside" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "work").rglob("*.pth"))


# ------------------------------------------------------------------------------------ the CLIs
def test_thread_default_and_verbose_flag(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = ("import os, sys\nfrom xtuner_vitask.cli import main\n"
            "main.SUBCOMMANDS['probe'] = ('xtuner_vitask.cli.make_tiny', 'x')\n"
            "main.NO_TORCH.discard('probe')\n"
            "import xtuner_vitask.cli.make_tiny as m\n"
            "m.run = lambda args: print(os.environ['OMP_NUM_THREADS'], args.verbose) or 0\n"
            "sys.exit(main.main(['probe', 'OUT']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    threads = max(1, min(8, len(os.sched_getaffinity(0)) // 2))
    assert proc.returncode == 0 and proc.stdout == f"{threads} False\n"
    assert f"xtuner-vitask: {threads} CPU thread(s) per process" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="3"))
    assert proc.stdout == "3 False\n" and "CPU thread" not in proc.stderr  # the user's choice is kept


def test_banner_loggers_are_quiet_after_their_packages_reset_them():
    import io
    import logging

    from xtuner_vitask.cli.main import quiet_banners

    quiet_banners()
    stream = io.StringIO()
    deepspeed = logging.getLogger("DeepSpeed")  # what deepspeed.utils.logging does when it is imported
    deepspeed.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    deepspeed.addHandler(handler)
    try:
        deepspeed.info("Setting ds_accelerator to cpu (auto detect)")
        deepspeed.warning("Setting accelerator to CPU.")
        deepspeed.error("a real DeepSpeed error")
    finally:
        deepspeed.removeHandler(handler)
    assert stream.getvalue() == "a real DeepSpeed error\n"
    assert not logging.getLogger("bitsandbytes.cextension").isEnabledFor(logging.WARNING)


@pytest.mark.slow  # imports deepspeed and bitsandbytes for real (tens of seconds each on a shared machine)
@pytest.mark.parametrize("quiet", [True, False])
def test_third_party_banners_are_quiet(quiet):
    code = ("from xtuner_vitask.cli.main import quiet_banners\n" + ("quiet_banners()\n" if quiet else "")
            + "import bitsandbytes, deepspeed\nfrom deepspeed.accelerator import get_accelerator\nget_accelerator()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    banners = ("ds_accelerator" in output, "compiled without GPU support" in output)
    assert proc.returncode == 0 and banners == ((False, False) if quiet else (True, True)), output
