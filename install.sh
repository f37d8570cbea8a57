#!/usr/bin/env bash
# The one place that knows the stack's versions. Creates ./.venv (or $VENV) and
# installs xtuner-vitask into it, editable.
#
#   bash install.sh          # CPU build of torch (this project's CI, laptops)
#   bash install.sh --gpu    # CUDA build of torch, for GPU machines
#
# Why the pins:
# - torch and torchvision must be one matched pair, named on one pip command;
#   an unpinned torch pulls a multi-GB CUDA build even on a CPU machine.
# - CPU: torch 2.13.0+cpu beside PyPI's torchvision 0.28.0, whose compiled ops
#   need the CUDA build; a .pth hook declares the missing op schemas before
#   torchvision is imported (see xtuner_vitask/_compat.py, which also explains
#   the second hook: mmengine's training-state types on torch>=2.6's weights-only
#   allowlist, so --resume works while every load stays weights-only).
# - GPU: torch 2.14.1 + torchvision 0.29.1 bring triton 3.8, with which
#   xtuner's pinned bitsandbytes 0.45.0 cannot import (triton.ops is gone);
#   a newer bitsandbytes is installed after xtuner for QLoRA users.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU="torch==2.13.0 torchvision==0.28.0"
TORCH_GPU="torch==2.14.1 torchvision==0.29.1"
BNB_GPU="bitsandbytes==0.49.1"
DEEPSPEED="deepspeed==0.16.2"

mode=cpu
[ "${1:-}" = "--gpu" ] && mode=gpu

stamp="$VENV/.xtuner-vitask-$mode"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt install.sh ]; then
  exit 0  # already installed and nothing changed
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
$pip install --upgrade pip setuptools wheel
if [ "$mode" = gpu ]; then
  $pip install $TORCH_GPU
else
  $pip install $TORCH_CPU
fi
# Import hooks (xtuner_vitask/_compat.py): torchvision's op schemas on CPU torch; for mmengine processes,
# mmengine's training-state types allowed in weights-only loads (XTuner's --resume reads the checkpoint
# before any config is loaded) and one-line VITaskErrors.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site/zz_xtuner_vitask_cpu_torchvision.pth"
echo 'import xtuner_vitask._compat as _m; _m.install_import_hooks()' > "$site/zz_xtuner_vitask.pth"
# torch is pinned above; pip must not replace it while resolving the rest.
$pip install -e ".[test]" "$DEEPSPEED" $( [ "$mode" = gpu ] && echo $TORCH_GPU || echo $TORCH_CPU )
if [ "$mode" = gpu ]; then
  $pip install "$BNB_GPU"
fi
"$VENV/bin/python" -c 'import torchvision, peft, xtuner.model, xtuner_vitask; print("xtuner-vitask installed:", xtuner_vitask.__version__)'
rm -f "$VENV"/.xtuner-vitask-*
touch "$stamp"
echo "install took $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
