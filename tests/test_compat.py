"""The import hooks of install.sh's .pth file (xtuner_vitask/_compat.py): weights-only loading stays on, mmengine's
training state is on its allowlist once mmengine is imported, and an uncaught VITaskError is one line."""
import os
import subprocess
import sys

from conftest import REPO


def run_python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=environment)


def test_mmengine_processes_load_training_state_weights_only():
    code = """
import os, sys, torch
assert 'mmengine' not in sys.modules
before = {str(g) for g in torch.serialization.get_safe_globals()}
import mmengine  # the .pth hook acts right after this import
from mmengine.logging.history_buffer import HistoryBuffer
buffer = HistoryBuffer()
buffer.update(1.5)
from mmengine.config import ConfigDict  # DeepSpeed's model states hold the ds_config as one
torch.save({'message_hub': {'loss': buffer}, 'ds_config': ConfigDict(zero_optimization=dict(stage=2)),
            'state_dict': {'w': torch.ones(2)}}, 'ckpt.pth')
loaded = torch.load('ckpt.pth')  # torch>=2.6's default: weights_only=True
assert loaded['message_hub']['loss'].current() == 1.5
from xtuner_vitask.tsm.checkpoint import load_weights_only  # a TSM load (VITask builds one) on the way
assert load_weights_only('ckpt.pth')['message_hub']['loss'].current() == 1.5
assert torch.load('ckpt.pth')['message_hub']['loss'].current() == 1.5  # resume still allowed afterwards
print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'), 'HistoryBuffer' in str(before))
"""
    proc = run_python(f"import os, tempfile; os.chdir(tempfile.mkdtemp()); exec({code!r})")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["None", "False"]  # nothing unsafe set; allowlisted only once mmengine loaded


def test_an_uncaught_vitask_error_is_one_line_in_xtuners_tools():
    code = "import mmengine; from xtuner_vitask.errors import VITaskError; raise VITaskError('x is wrong: do y')"
    proc = run_python(code)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: x is wrong: do y"
    assert "Traceback" not in proc.stderr
    proc = run_python(code, VITASK_TRACEBACK="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = run_python("import mmengine; raise KeyError('other errors keep their traceback')")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
