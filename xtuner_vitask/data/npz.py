"""Finding, downloading, checking and reading MedMNIST npz files (the layout medmnist publishes).

A MedMNIST 2D npz holds ``{split}_images`` (uint8, N x H x W, or N x H x W x 3 for RGB sets) and
``{split}_labels`` (integers, N x 1, or N x 14 multi-hot for ChestMNIST) for the splits train, val
and test. medmnist's own Dataset classes assert that each split has INFO's size, so this module
reads the file with numpy: smaller files with the same keys (tests, users' subsets) are accepted
with a warning. Everything is checked from the arrays' headers and labels before any image is
read, so a bad file fails in a second with one line naming the problem.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtuner_vitask.contract import MULTI_LABEL, SPLITS
from xtuner_vitask.data.medmnist import (
    check_flag, check_size, dataset_info, label_names, medmnist_info_module, task_type,
)
from xtuner_vitask.errors import VITaskError

# What a damaged zip member raises while it is read: a bad CRC, a broken deflate stream, a cut file.
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


class SplitSizeWarning(UserWarning):
    """A split's size differs from ``medmnist.INFO`` (a subset or a generated test file)."""


def size_suffix(size: int) -> str:
    """medmnist's file/INFO-key suffix: '' for 28 px, '_64' / '_128' / '_224' otherwise."""
    return "" if check_size(size) == 28 else f"_{size}"


def npz_filename(flag: str, size: int) -> str:
    """The file name medmnist uses, e.g. ``dermamnist.npz`` (28 px) or ``dermamnist_224.npz``."""
    return f"{check_flag(flag)}{size_suffix(size)}.npz"


def expected_md5(flag: str, size: int) -> str:
    """The MD5 that ``medmnist.INFO`` lists for the file of ``flag`` at ``size``."""
    return dataset_info(flag)[f"MD5{size_suffix(size)}"]


def default_root() -> str:
    """medmnist's default root (``~/.medmnist``)."""
    return medmnist_info_module().DEFAULT_ROOT or os.path.join(os.path.expanduser("~"), ".medmnist")


def file_md5(path: Path, chunk: int = 1 << 22) -> str:
    """Hex MD5 of a file, read in 4 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download_npz(flag: str, size: int, root: str | os.PathLike) -> Path:
    """Fetch the npz with medmnist's own download (torchvision ``download_url``, MD5-checked)."""
    import medmnist  # heavy (torch): only when a download is asked for

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = size_suffix(size)
    info = dataset_info(flag)
    # medmnist's download() reads only these attributes; building the Dataset itself would load
    # the whole file and assert INFO's split sizes.
    dataset_class = getattr(medmnist, info["python_class"])
    downloader = dataset_class.__new__(dataset_class)
    downloader.info, downloader.root, downloader.size_flag = info, str(root), suffix
    try:
        downloader.download()
    except Exception as exc:  # medmnist turns every failure into a multi-line RuntimeError
        raise VITaskError(
            f"download of {npz_filename(flag, size)} failed ({type(exc).__name__}; no network?): "
            f"fetch {info['url' + suffix]} yourself and put it in {root}, then pass --root {root}"
        ) from None
    return root / npz_filename(flag, size)


def locate_npz(flag: str, size: int, root=None, npz_path=None, download: bool = False) -> Path:
    """The npz to convert: ``npz_path`` if given, else medmnist's file name under ``root``."""
    if npz_path is not None:
        path = Path(npz_path)
    else:
        root = Path(root) if root is not None else Path(default_root())
        path = root / npz_filename(flag, size)
        if download:
            return download_npz(flag, size, root)
    if not path.is_file():
        hint = "pass --root DIR holding it" if npz_path is None else "check the path"
        raise VITaskError(
            f"MedMNIST file not found: {path} ({hint}, or --download where a network exists)"
        )
    return path


def verify_md5(path: Path, flag: str, size: int, md5: str | None = None) -> str:
    """Check the file against ``medmnist.INFO``'s MD5; returns the file's MD5."""
    md5 = md5 or file_md5(path)
    want = expected_md5(flag, size)
    if md5 != want:
        raise VITaskError(
            f"MD5 mismatch for {path}: got {md5}, medmnist.INFO lists {want} for "
            f"{npz_filename(flag, size)} (re-download it, or drop --verify for your own subset)"
        )
    return md5


@dataclass
class NpzLayout:
    """Header facts of one MedMNIST npz: shapes and dtypes per key, without reading the arrays."""

    path: Path
    arrays: dict  # key -> (shape, dtype)


def read_layout(path: Path) -> NpzLayout:
    """Shapes and dtypes of every array in the npz, read from the .npy headers only."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                arrays[member[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise VITaskError(f"{path} is not a readable npz file ({exc}): re-download or regenerate it") from None
    return NpzLayout(path, arrays)


def check_layout(layout: NpzLayout, flag: str, size: int, splits=SPLITS) -> dict:
    """Check keys, dtypes and shapes against ``flag``/``size``; returns {split: n_images}."""
    info = dataset_info(flag)
    n_channels = info["n_channels"]
    label_width = len(info["label"]) if task_type(flag) == MULTI_LABEL else 1
    want_image_shape = (size, size) if n_channels == 1 else (size, size, 3)
    counts = {}
    for split in splits:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in layout.arrays:
                raise VITaskError(
                    f"{layout.path} has no '{key}' array (found: {', '.join(sorted(layout.arrays))}); "
                    "a MedMNIST npz holds train/val/test _images and _labels"
                )
        image_shape, image_dtype = layout.arrays[f"{split}_images"]
        label_shape, label_dtype = layout.arrays[f"{split}_labels"]
        if image_dtype != np.uint8:
            raise VITaskError(f"{layout.path}: {split}_images has dtype {image_dtype}, expected uint8")
        if image_shape[1:] != want_image_shape:
            channels = "grayscale N x H x W" if n_channels == 1 else "RGB N x H x W x 3"
            raise VITaskError(
                f"{layout.path}: {split}_images has shape {image_shape}, expected {channels} with "
                f"H=W={size} for {flag} (wrong channel count or --size?)"
            )
        if not np.issubdtype(label_dtype, np.integer):
            raise VITaskError(f"{layout.path}: {split}_labels has dtype {label_dtype}, expected integers")
        if len(label_shape) != 2 or label_shape[1] != label_width:
            raise VITaskError(
                f"{layout.path}: {split}_labels has shape {label_shape}, expected (N, {label_width}) for {flag}"
            )
        if label_shape[0] != image_shape[0]:
            raise VITaskError(
                f"{layout.path}: {split} has {image_shape[0]} images but {label_shape[0]} labels"
            )
        counts[split] = image_shape[0]
        if counts[split] == 0:
            raise VITaskError(f"{layout.path}: the {split} split is empty")
    differing = {s: n for s, n in counts.items() if n != info["n_samples"][s]}
    if differing:
        warnings.warn(
            f"{layout.path.name}: split sizes {differing} differ from medmnist.INFO's "
            f"{ {s: info['n_samples'][s] for s in differing} } (a subset or a generated file)",
            SplitSizeWarning, stacklevel=3,
        )
    return counts


def load_labels(npz, flag: str, split: str, path: Path) -> list[list[int]]:
    """The split's labels as lists of class indices, checked against ``flag``'s classes."""
    try:
        raw = np.asarray(npz[f"{split}_labels"]).astype(np.int64)
    except _CORRUPT as exc:
        raise corrupted(path, f"{split}_labels", exc) from None
    names = label_names(flag)
    if task_type(flag) == MULTI_LABEL:
        bad = ~np.isin(raw, (0, 1))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise VITaskError(
                f"{path}: {split}_labels row {row} is {raw[row].tolist()}, expected a 0/1 vector "
                f"over {flag}'s {len(names)} findings"
            )
        return [np.flatnonzero(row).tolist() for row in raw]
    column = raw[:, 0]
    bad = (column < 0) | (column >= len(names))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise VITaskError(
            f"{path}: {split}_labels row {row} is {int(column[row])}, outside {flag}'s classes "
            f"0..{len(names) - 1}"
        )
    return [[int(v)] for v in column]


def corrupted(path, key: str, exc: BaseException) -> VITaskError:
    return VITaskError(f"{path}: the '{key}' array is corrupted ({type(exc).__name__}: {exc}); "
                       "re-download the file (--verify checks its MD5)")


def iter_array_chunks(path: Path, key: str, chunk_bytes: int = 2 << 20):
    """Yield ``(start_row, rows)`` of one npz array, decompressing a few MiB at a time.

    Memory stays bounded even for 224 px sets of several GB (``np.load`` would read a whole split).
    A damaged member (bad CRC, broken deflate stream, cut short) is a VITaskError naming the array.
    """
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            if fortran and len(shape) > 1:  # never written by medmnist; numpy can still read it
                with np.load(path) as npz:
                    array = npz[key]
                yield 0, np.ascontiguousarray(array)
                return
            row_shape = tuple(shape[1:])
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            rows_per_chunk = max(1, chunk_bytes // max(1, row_bytes))
            for start in range(0, shape[0], rows_per_chunk):
                n_rows = min(rows_per_chunk, shape[0] - start)
                buffer = handle.read(n_rows * row_bytes)
                if len(buffer) != n_rows * row_bytes:
                    raise VITaskError(f"{path}: '{key}' is truncated at row {start}; re-download the file")
                yield start, np.frombuffer(buffer, dtype=dtype).reshape((n_rows,) + row_shape)
    except _CORRUPT as exc:
        raise corrupted(path, key, exc) from None


def generated_marker(npz_path) -> Path:
    """Side file that :func:`xtuner_vitask.testing.medmnist_npz.write_medmnist_npz` puts beside a
    synthetic npz (the npz itself keeps medmnist's exact layout); converters copy it into meta.json."""
    npz_path = Path(npz_path)
    return npz_path.with_name(npz_path.name + ".generated.json")
