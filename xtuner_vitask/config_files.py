"""The configs shipped with the package (``configs/`` of the checkout, ``xtuner_vitask.configs`` once
installed): find one by name, list them, copy one out to edit -- as ``xtuner list-cfg`` / ``copy-cfg``
do for XTuner's own configs."""
import fnmatch
import importlib.util
import os
import re
import shutil
from pathlib import Path

from .errors import VITaskError

# `from .vitask._base_vitask_internvl2 import *` inside `with read_base():` -> the folder "vitask"
_RELATIVE_BASE = re.compile(r"^\s*from\s+\.(\w+)\.\w+\s+import", re.MULTILINE)


def configs_dir() -> Path:
    """The folder of the shipped configs (the checkout's ``configs/`` in an editable install)."""
    spec = importlib.util.find_spec("xtuner_vitask.configs")
    if spec is None or not spec.submodule_search_locations:
        raise VITaskError("the package has no configs (xtuner_vitask.configs): reinstall xtuner-vitask")
    return Path(list(spec.submodule_search_locations)[0])


def config_names(pattern: str | None = None) -> dict:
    """``{name: path}`` of every shipped config (not the ``_base`` files), optionally filtered by a glob."""
    names = {path.stem: path for path in sorted(configs_dir().glob("*.py")) if not path.name.startswith("_")}
    if pattern:
        names = {n: p for n, p in names.items() if fnmatch.fnmatch(n, pattern if "*" in pattern else f"*{pattern}*")}
    return names


def config_path(name: str) -> Path:
    """The path of the shipped config ``name`` (with or without ``.py``); one clear error naming the choices."""
    stem = os.path.basename(str(name))[:-3] if str(name).endswith(".py") else str(name)
    names = config_names()
    if stem not in names:
        close = [n for n in names if stem.split("_")[0] in n][:5] or list(names)[:5]
        raise VITaskError(f"no shipped config named {stem!r} (e.g. {', '.join(close)}): "
                          "`xtuner-vitask list-cfg` lists them all")
    return names[stem]


def copy_config(name: str, dest_dir, suffix: str = "_copy") -> Path:
    """Copy config ``name`` into ``dest_dir`` as ``<name><suffix>.py``, with the base folders it reads
    (``vitask/``, ``tsm/``; ``read_base`` imports are relative) and DeepSpeed JSONs; returns the new path."""
    source = config_path(name)
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise VITaskError(f"{dest_dir} is a file: pass a folder to copy the config into")
    target = dest_dir / f"{source.stem}{suffix}.py"
    if target.exists():
        raise VITaskError(f"{target} exists: remove it or pass another folder")
    dest_dir.mkdir(parents=True, exist_ok=True)
    for folder in sorted(set(_RELATIVE_BASE.findall(source.read_text(encoding="utf-8")))):
        if not (dest_dir / folder).exists():
            shutil.copytree(source.parent / folder, dest_dir / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    shutil.copyfile(source, target)
    return target
