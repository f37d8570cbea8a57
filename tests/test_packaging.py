"""The configs ship inside the package (`xtuner-vitask list-cfg` / `copy-cfg`, as XTuner does), and a
wheel install -- not the editable checkout -- finds them and runs."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mmengine.config import Config

from xtuner_vitask.cli.main import main
from xtuner_vitask.config_files import config_names, config_path, configs_dir, copy_config
from xtuner_vitask.errors import VITaskError

REPO = Path(__file__).resolve().parents[1]


def test_every_top_level_config_is_shipped():
    shipped = set(config_names())
    in_checkout = {p.stem for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_")}
    assert shipped == in_checkout and "vitask_internvl2_2b_derma" in shipped
    assert config_path("vitask_tiny_cpu.py") == configs_dir() / "vitask_tiny_cpu.py"


def test_copy_cfg_brings_the_base_it_reads(tmp_path, capsys):
    assert main(["copy-cfg", "vitask_internvl2_2b_derma", str(tmp_path)]) == 0
    copied = tmp_path / "vitask_internvl2_2b_derma_copy.py"
    assert copied.is_file() and (tmp_path / "vitask" / "_base_vitask_internvl2.py").is_file()
    original = Config.fromfile(str(config_path("vitask_internvl2_2b_derma")))
    assert Config.fromfile(str(copied)).to_dict()["model"] == original.to_dict()["model"]
    with pytest.raises(VITaskError, match="exists: remove it"):
        copy_config("vitask_internvl2_2b_derma", tmp_path)
    assert main(["copy-cfg", "vitask_internvl2_2b_dermaa", str(tmp_path)]) == 2
    assert "no shipped config named 'vitask_internvl2_2b_dermaa'" in capsys.readouterr().err


def test_list_cfg_filters(capsys):
    assert main(["list-cfg", "-p", "tsm_vit_base_*"]) == 0
    names = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(names) == 13 and all(n.startswith("tsm_vit_base_") for n in names)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """Build a wheel, install it (no deps) into a fresh venv whose dependencies come from this venv's
    site-packages (a plain path entry: this venv's editable finder is NOT active there).
    Returns (venv folder, its site-packages, env to run it with)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, text=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps_from_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "zz_xtuner_vitask.pth").write_text("import xtuner_vitask._compat as _m; _m.install_import_hooks()\n")
    wheel = next(wheels.glob("xtuner_vitask-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, text=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    return venv, site, env


@pytest.mark.slow
def test_wheel_install_finds_its_configs(wheel_venv, tmp_path):
    """Used from outside the checkout, the installed wheel finds the configs it ships."""
    venv, site, env = wheel_venv
    where = subprocess.run([venv / "bin" / "python", "-c", "import xtuner_vitask.config_files as c; "
                            "print(c.configs_dir())"], cwd=tmp_path, env=env, check=True, capture_output=True,
                           text=True).stdout.strip()
    assert where.startswith(str(site)) and (Path(where) / "deepspeed" / "zero2_cpu.json").is_file()
    listed = subprocess.run([venv / "bin" / "xtuner-vitask", "list-cfg", "-p", "vitask_tiny*"], cwd=tmp_path,
                            env=env, check=True, capture_output=True, text=True).stdout
    assert "vitask_tiny_cpu" in listed


@pytest.mark.slow
def test_quick_demo_runs_from_the_wheel_install(wheel_venv, tmp_path):
    """`xtuner-vitask demo --quick` of the installed wheel, outside the checkout (the demo's end-to-end test:
    data -> TSM -> VITask and the vanilla recipe through XTuner's train tool -> export -> eval -> chat)."""
    venv, site, env = wheel_venv
    out = tmp_path / "demo"
    proc = subprocess.run([venv / "bin" / "xtuner-vitask", "demo", "--quick", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"] == "generated" and saved["wall_time_s"] > 0
    assert [r["model"] for r in saved["rows"]] == ["vanilla", "vitask_no_ep", "vitask_ep", "tsm"]
    for row in saved["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
    for png in ("confusion_vanilla.png", "confusion_vitask_ep.png", "confusion_tsm.png", "loss_curves.png",
                "fig4_response_ranking.png", "grad_norm.png"):
        assert (out / png).stat().st_size > 1000
    for model in ("vanilla", "VITask w/o EP"):
        r = saved["response_ranking"][model]
        assert r["n_pairs"] == 32 and 0.0 < r["positive_mean"] < 1.0 and 0.0 <= r["ranked_correctly"] <= 1.0
    assert saved["chat"]["answer"] is not None
