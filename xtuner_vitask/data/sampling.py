"""Stratified, seeded subsets of a split (``--limit-per-split`` / ``--fraction``)."""
from __future__ import annotations

import numpy as np

from xtuner_vitask.errors import VITaskError


def stratum_of(labels: list[int]) -> int:
    """The stratum of one record: its class, or for multi-label its first finding (-1 = none)."""
    return labels[0] if labels else -1


def subset_size(n_total: int, limit: int | None, fraction: float | None) -> int:
    """How many records a split keeps under ``limit`` or ``fraction`` (at least one)."""
    if limit is not None and fraction is not None:
        raise VITaskError("give either --limit-per-split or --fraction, not both")
    if limit is not None:
        if int(limit) < 1:
            raise VITaskError(f"--limit-per-split must be a positive count, got {limit}")
        return min(int(limit), n_total)
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise VITaskError(f"--fraction must be in (0, 1], got {fraction}")
        return max(1, min(n_total, int(round(float(fraction) * n_total))))
    return n_total


def stratified_indices(strata, n_keep: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n_keep`` records drawn per stratum in proportion to its size.

    Each stratum gets its proportional share (largest remainders round up); when ``n_keep`` allows,
    every stratum keeps at least one record so that rare classes survive a small subset.
    """
    strata = np.asarray(strata)
    n_total = len(strata)
    if n_keep >= n_total:
        return np.arange(n_total)
    values, counts = np.unique(strata, return_counts=True)
    exact = counts * n_keep / n_total
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: n_keep - quota.sum()]:
        quota[k] += 1
    if n_keep >= len(values):
        # Move single slots from the largest strata to empty ones.
        for k in np.flatnonzero(quota == 0):
            quota[int(np.argmax(quota))] -= 1
            quota[k] = 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(strata == value), size=q, replace=False)
        for value, q in zip(values, quota) if q
    ]
    return np.sort(np.concatenate(chosen))
