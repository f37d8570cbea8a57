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
import tempfile
from contextlib import contextmanager
from pathlib import Path

from xtuner_vitask.errors import VITaskError

# zlib level of the PNGs (Pillow's default); the benchmark's plain loop uses the same value.
PNG_COMPRESS_LEVEL = 6


def refuse_existing(out_dir: Path, force: bool) -> None:
    """VITaskError if ``out_dir`` exists and ``force`` is not set."""
    if Path(out_dir).exists() and not force:
        raise VITaskError(f"{out_dir} already exists: pass --force to replace it, or choose another --out")


@contextmanager
def atomic_output_dir(out_dir, force: bool = False):
    """Yield a fresh ``OUT.tmp-xxxx`` folder beside ``out_dir``; rename it to ``out_dir`` on success.

    On any exception (or Ctrl-C) the temporary folder is removed and ``out_dir`` is untouched. With
    ``force`` an existing ``out_dir`` is replaced only once the new one is complete.
    """
    out = Path(out_dir)
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary data folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() or out.is_symlink():
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
            self._pool = context.Pool(self.workers)
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


def write_jsonl(path, records) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept readable)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file (VITaskError naming the line when one is not JSON)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise VITaskError(f"{path} line {number} is not JSON ({exc.msg})") from None
    return records


def write_json(path, data) -> None:
    """Pretty JSON (meta files are read by people too)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
