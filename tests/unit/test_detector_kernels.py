"""The compiled near-duplicate kernel against the numpy formulation it replaced (bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest

from services.auditor.detector_kernels import nearest_earlier
from services.auditor.detectors import REPEAT_TOLERANCE_SQUARED, squared_distances


def numpy_nearest_earlier(candidates: np.ndarray, first: int, history: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest earlier candidate within the window, with whole-array numpy operations."""
    queries = candidates[first:]
    D = squared_distances(queries, candidates)
    position = first + np.arange(queries.shape[0])[:, None]
    column = np.arange(candidates.shape[0])[None, :]
    D[(column >= position) | (column < position - history)] = np.inf
    is_repeat = D <= REPEAT_TOLERANCE_SQUARED
    repeat = np.any(is_repeat, axis=1)
    D[is_repeat] = np.inf
    return D.min(axis=1), repeat


def kernel_nearest_earlier(candidates: np.ndarray, first: int, history: int) -> tuple[np.ndarray, np.ndarray]:
    queries = candidates[first:]
    nearest = np.empty(queries.shape[0])
    repeat = np.empty(queries.shape[0], dtype=np.bool_)
    nearest_earlier(
        queries @ candidates.T,
        np.einsum("ij,ij->i", queries, queries),
        np.einsum("ij,ij->i", candidates, candidates),
        first,
        history,
        REPEAT_TOLERANCE_SQUARED,
        nearest,
        repeat,
    )
    return nearest, repeat


@pytest.mark.parametrize(
    ("earlier", "new", "history", "features"),
    [(0, 40, 10, 3), (300, 120, 50, 80), (5000, 512, 5000, 80), (20, 200, 5000, 7)],
)
def test_kernel_equals_numpy(earlier: int, new: int, history: int, features: int) -> None:
    rng = np.random.default_rng(earlier + new)
    candidates = rng.normal(size=(earlier + new, features))
    # Exact repeats of an earlier row, near repeats (within and just outside the tolerance) and
    # near-duplicates, both inside and outside the history window.
    for i in range(earlier, earlier + new, 7):
        source = int(rng.integers(0, i)) if i else 0
        candidates[i] = candidates[source] + rng.choice([0.0, 1e-9, 1e-3, 0.05]) * rng.normal(size=features)
    expected = numpy_nearest_earlier(candidates, earlier, history)
    got = kernel_nearest_earlier(candidates, earlier, history)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[1].any(), "the data must contain repeats"
    if earlier == 0:
        assert got[0][0] == np.inf, "the very first query has nothing before it"
