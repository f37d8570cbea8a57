"""Writing a converted data set: a temporary folder renamed when complete, PNGs on worker processes.

The main process reads (decompresses) image rows and builds the JSONL records; ``workers``
processes encode and write the PNGs, so with two cores a conversion can beat a single-process loop
that only writes the PNGs.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from xtuner_vitask.contract import META_FILE, SPLITS, load_meta
from xtuner_vitask.errors import VITaskError

# zlib level of the PNGs (Pillow's default); the benchmark's plain loop uses the same value.
PNG_COMPRESS_LEVEL = 6


# What a converter writes into its output folder; --force replaces only a folder holding no more than this.
OUTPUT_ENTRIES = frozenset({META_FILE, "images"} | {f"{split}.jsonl" for split in SPLITS})
_TMP_MARK = ".tmp-"


def refuse_existing(out_dir, force: bool) -> None:
    """VITaskError unless ``out_dir`` is new, or ``force`` is set and it is a set a converter wrote.

    A converter's own folder is recognised by its meta.json (a valid contract meta.json) and holds
    nothing but meta.json, {train,val,test}.jsonl and images/; any other existing path is refused
    even with ``force`` (a mistyped ``--out`` must never replace a user's folder).
    """
    out = Path(out_dir)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise VITaskError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if not out.is_dir():
        raise VITaskError(f"{out} exists and is not a folder: --force only replaces a converted set; "
                          "choose another --out")
    entries = {entry.name for entry in out.iterdir()}
    if not entries:
        return
    try:
        load_meta(out / META_FILE)
    except VITaskError:
        raise VITaskError(f"{out} is not a set written by data_tools (no valid meta.json): --force only replaces "
                          "a converted set; choose another --out or empty it yourself") from None
    foreign = sorted(entries - OUTPUT_ENTRIES)
    if foreign:
        raise VITaskError(f"{out} holds files a converter does not write ({', '.join(foreign[:5])}): --force "
                          "will not delete them; choose another --out or move them away")


def _alive(host: str, pid: int) -> bool:
    """Whether a process that wrote a temporary folder may still run (unknown hosts count as alive)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[str]:
    """Remove ``OUT.tmp-HOST-PID-*`` folders beside ``out`` whose process is gone (a killed run's).

    Returns their names. Folders of a run still in progress (or of another host) are left alone.
    """
    removed = []
    prefix = f"{out.name}{_TMP_MARK}"
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix) or not path.is_dir() or path.is_symlink():
            continue
        parts = path.name[len(prefix):].split("-")
        if len(parts) < 3 or not parts[-2].isdigit():
            continue  # not named by this module
        host, pid = "-".join(parts[:-2]), int(parts[-2])
        if not _alive(host, pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


@contextmanager
def atomic_output_dir(out_dir, force: bool = False):
    """Yield a fresh ``OUT.tmp-HOST-PID-xxxx`` folder beside ``out_dir``; rename it to ``out_dir`` on success.

    On any exception (or Ctrl-C, or SIGTERM turned into one by the CLI) the temporary folder is
    removed and ``out_dir`` is untouched; a run killed outright leaves its folder, which the next run
    into the same ``out_dir`` removes. With ``force`` an existing converted set is replaced only
    once the new one is complete (see :func:`refuse_existing`).
    """
    out = Path(out_dir)
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(out)
    if stale:
        print(f"removed {len(stale)} temporary folder(s) of an interrupted run: {', '.join(stale)}", file=sys.stderr)
    host = socket.gethostname().replace(os.sep, "_")
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}{_TMP_MARK}{host}-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary data folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() or out.is_symlink():
        refuse_existing(out, force)  # still a converted set (nothing was put there meanwhile)
        old = out.with_name(f"{tmp.name}.old")
        out.rename(old)
        tmp.rename(out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        tmp.rename(out)


def encode_png(image, path: str) -> None:
    """Write one uint8 image (H x W grayscale or H x W x 3 RGB) as PNG.

    Encoded in memory and written with one call: on slow file systems Pillow's own
    ``save(path)`` (a read-write buffered file, flushed in pieces) costs about a third more.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _quiet_worker() -> None:
    """Pool workers leave Ctrl-C and SIGTERM to the main process, which terminates them: no worker tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_chunk(task) -> int:
    directory, names, images = task
    for name, image in zip(names, images):
        encode_png(image, os.path.join(directory, name))
    return len(names)


class PngWriter:
    """Encodes and writes chunks of images on ``workers`` processes (in-process when ``workers <= 1``).

    Use as a context manager; :meth:`write` takes an iterable of ``(names, images)`` chunks for one
    folder and returns after all of them are on disk, advancing ``bar`` (a tqdm) as chunks finish.
    """

    def __init__(self, workers: int = 2):
        self.workers = max(1, int(workers))
        self._pool = None

    def __enter__(self):
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            # fork: workers start in milliseconds and need nothing pickled but the chunks
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = context.Pool(self.workers, initializer=_quiet_worker)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None
        return False

    def write(self, directory, chunks, bar=None) -> int:
        """Write every ``(names, images)`` chunk into ``directory``; returns the number of images."""
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        return self.run(_write_chunk, ((directory, names, images) for names, images in chunks), bar)

    def run(self, function, tasks, bar=None) -> int:
        """Apply a picklable ``function`` (task -> images done) to every task on the workers."""
        results = self._pool.imap_unordered(function, tasks) if self._pool else map(function, tasks)
        total = 0
        for count in results:
            total += count
            if bar is not None:
                bar.update(count)
        return total


def write_json(path, data) -> None:
    """Pretty JSON (meta files are read by people too)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
