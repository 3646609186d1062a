"""The compiled detector kernels against the numpy and Python formulations they replaced (bit for bit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from services.auditor.detector_kernels import nearest_earlier
from services.auditor.detectors import (
    REPEAT_TOLERANCE,
    REPEAT_TOLERANCE_SQUARED,
    PradaDetector,
    ReferenceProfile,
    squared_distances,
)


def exact_pairs(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distances of every query to every row, from exact squared differences in float64."""
    return ((queries.astype(np.float64)[:, None, :] - rows.astype(np.float64)[None, :, :]) ** 2).sum(axis=2)


def exact_nearest_earlier(candidates: np.ndarray, first: int, history: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest earlier candidate within the window and repeats, from exact squared differences."""
    D = exact_pairs(candidates[first:], candidates)
    position = first + np.arange(D.shape[0])[:, None]
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
        queries,
        candidates,
        np.einsum("ij,ij->i", queries, queries, dtype=np.float64),
        np.einsum("ij,ij->i", candidates, candidates, dtype=np.float64),
        first,
        history,
        REPEAT_TOLERANCE_SQUARED,
        nearest,
        repeat,
    )
    return nearest, repeat


@pytest.mark.parametrize(
    ("earlier", "new", "history", "features"),
    [(0, 40, 10, 3), (300, 120, 50, 80), (1000, 200, 1000, 80), (20, 200, 5000, 7)],
)
def test_kernel_equals_exact_arithmetic(earlier: int, new: int, history: int, features: int) -> None:
    """Float32 product to screen, exact arithmetic for the pairs that may decide: repeats and every
    nearest distance are those of exact arithmetic (up to the order of the sum of squared
    differences), though the float32 product is off by up to ~1e-6 of the distance."""
    rng = np.random.default_rng(earlier + new)
    candidates = rng.normal(size=(earlier + new, features))
    # Exact repeats of an earlier row, near repeats (within and just outside the tolerance) and
    # near-duplicates, both inside and outside the history window; and near ties, pairs of earlier
    # rows at distances from a query that differ by less than the float32 product can tell apart.
    for i in range(earlier, earlier + new, 7):
        source = int(rng.integers(0, i)) if i else 0
        noise = rng.choice([0.0, 1e-9, 1e-6, 2e-5, 1e-3, 0.05, 0.3])
        candidates[i] = candidates[source] + noise * rng.normal(size=features)
    for i in range(earlier + 3, earlier + new, 11):
        twin = candidates[i - 2].copy()
        twin[0] += 1e-6
        candidates[i - 1] = twin
    candidates = candidates.astype(np.float32)
    expected, expected_repeat = exact_nearest_earlier(candidates, earlier, history)
    got, got_repeat = kernel_nearest_earlier(candidates, earlier, history)
    np.testing.assert_array_equal(got_repeat, expected_repeat)
    assert got_repeat.any(), "the data must contain repeats"
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-12, atol=0)
    # The screening alone would not do: the float32 product's distances are off by far more.
    queries = candidates[earlier:]
    screened = (
        (queries.astype(np.float64) ** 2).sum(axis=1)[:, None]
        + (candidates.astype(np.float64) ** 2).sum(axis=1)[None, :]
        - 2.0 * (queries @ candidates.T).astype(np.float64)
    )
    assert (
        np.max(np.abs(screened[:, : earlier or 1] - exact_pairs(queries, candidates[: earlier or 1]))) > 1e-9
    )
    if earlier == 0:
        assert got[0] == np.inf, "the very first query has nothing before it"


def test_results_do_not_depend_on_how_the_product_was_blocked() -> None:
    """The same queries scored whole and in uneven chunks, whose float32 products BLAS computes with
    different blockings, give bit-for-bit equal distances (the detector's incremental state relies
    on it)."""
    rng = np.random.default_rng(11)
    candidates = rng.normal(size=(3000, 80)).astype(np.float32)
    whole, whole_repeat = kernel_nearest_earlier(candidates, 0, 1000)
    parts, parts_repeat = [], []
    for start, stop in [(0, 137), (137, 1001), (1001, 1003), (1003, 3000)]:
        window = candidates[max(0, start - 1000) : stop]
        got, got_repeat = kernel_nearest_earlier(window, start - max(0, start - 1000), 1000)
        parts.append(got)
        parts_repeat.append(got_repeat)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(np.concatenate(parts_repeat), whole_repeat)


def test_near_repeats_at_the_tolerance_are_told_apart_exactly() -> None:
    """Pairs a hair inside and outside the repeat tolerance, far below float32's rounding of the
    expanded product (~1e-5 here), are classified as exact arithmetic classifies them."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(64, 80)).astype(np.float32)
    twins = base.copy()
    step = np.float32(REPEAT_TOLERANCE / 2)  # one feature moved: squared distance tol^2 / 4
    twins[::2, 0] += step
    twins[1::2, 0] += np.float32(REPEAT_TOLERANCE * 2)  # squared distance 4 tol^2
    candidates = np.vstack([base, twins])
    expected, expected_repeat = exact_nearest_earlier(candidates, 64, 128)
    got, got_repeat = kernel_nearest_earlier(candidates, 64, 128)
    np.testing.assert_array_equal(got_repeat, expected_repeat)
    assert got_repeat[::2].all()
    assert not got_repeat[1::2].any()
    np.testing.assert_allclose(got[1::2], expected[1::2], rtol=1e-12, atol=0)


class PythonLoopPrada(PradaDetector):
    """PRADA with the growing-set rule as the Python loop that `grow_members` replaced."""

    def _grow_class(self, arrays: dict[str, np.ndarray], c: int, Zc: np.ndarray) -> tuple[np.ndarray, int]:
        k = self._class_index(arrays, c)
        old = arrays[f"members_{c}"].astype(np.float64)
        n_old, n = old.shape[0], Zc.shape[0]
        to_old = squared_distances(Zc, old) if n_old else np.zeros((n, 0))
        to_new = squared_distances(Zc, Zc)
        joined = np.empty(n, dtype=np.int64)
        n_joined = old_start = joined_start = 0
        count, mean = int(arrays["join_count"][k]), float(arrays["join_mean"][k])
        m2, T = float(arrays["join_m2"][k]), float(arrays["threshold"][k])
        d_out = np.full(n, np.nan)
        repeats = 0
        for i in range(n):
            active = (n_old - old_start) + (n_joined - joined_start)
            if active == 0:
                d = 0.0
            else:
                d = math.inf
                if old_start < n_old:
                    d = float(to_old[i, old_start:].min())
                if joined_start < n_joined:
                    d = min(d, float(to_new[i, joined[joined_start:n_joined]].min()))
                d = math.sqrt(d)
                if d <= REPEAT_TOLERANCE:
                    repeats += 1
                    continue
                d_out[i] = d
            if active == 0 or d > T:
                joined[n_joined] = i
                n_joined += 1
                count += 1
                step = d - mean
                mean += step / count
                m2 += step * (d - mean)
                T = max(T, mean - math.sqrt(m2 / count))
                if active + 1 > self.max_members:
                    if old_start < n_old:
                        old_start += 1
                    else:
                        joined_start += 1
        arrays["join_count"][k], arrays["join_mean"][k] = count, mean
        arrays["join_m2"][k], arrays["threshold"][k] = m2, T
        arrays[f"members_{c}"] = np.concatenate([old[old_start:], Zc[joined[joined_start:n_joined]]]).astype(
            np.float32
        )
        return d_out, repeats


@pytest.mark.parametrize(("max_members", "features", "classes"), [(1000, 80, 4), (7, 3, 3), (1, 5, 2)])
def test_prada_kernel_equals_python_loop(max_members: int, features: int, classes: int) -> None:
    """The same stream through both: equal states (bytes) and results after every update.

    The stream mixes fresh queries, exact and near repeats of earlier ones and a slowly growing
    cluster, in updates of uneven sizes, with member sets small enough to evict (FIFO).
    """
    rng = np.random.default_rng(max_members + features)
    profile = ReferenceProfile.from_reference(rng.normal(size=(400, features)))
    compiled = PradaDetector(profile, max_members=max_members, max_distances=300)
    python = PythonLoopPrada(profile, max_members=max_members, max_distances=300)
    state_c: bytes | None = None
    state_p: bytes | None = None
    history = rng.normal(size=(1, features))
    for size in (1, 2, 37, 80, 5, 300, 80, 1):
        rows = rng.normal(size=(size, features)) * rng.choice([0.01, 1.0, 3.0], size=(size, 1))
        pick = rng.random(size)
        earlier = history[rng.integers(0, history.shape[0], size)]
        rows = np.where((pick < 0.15)[:, None], earlier, rows)  # exact repeats
        rows = np.where(((pick >= 0.15) & (pick < 0.25))[:, None], earlier + 1e-6, rows)  # near repeats
        labels = rng.integers(0, classes, size)
        state_c, result_c = compiled.update(state_c, rows, labels)
        state_p, result_p = python.update(state_p, rows, labels)
        assert state_c == state_p
        assert result_c == result_p
        history = np.vstack([history, rows])
    # The stream exercised repeats, the normality checks and, with small member sets, evictions.
    details = result_c.details
    assert details["repeats"] > 0
    assert details["checks"] > 0
    if max_members < 100:
        assert details["growing_set_size"] == max_members * details["classes"]


@pytest.mark.parametrize("size", [3, 4, 5, 11, 50, 51, 1000, 4999, 5000])
def test_shapiro_statistic_equals_scipy(size: int) -> None:
    """scipy's routine called directly gives stats.shapiro's W bit for bit (normal, skewed, tied data)."""
    from services.auditor import detectors

    assert detectors._swilk is not None, "scipy moved its Shapiro-Wilk routine: update shapiro_statistic"
    rng = np.random.default_rng(size)
    for sample in (rng.normal(size=size), rng.lognormal(size=size), np.round(rng.normal(size=size), 1) + 5):
        if np.ptp(sample) == 0:
            continue
        assert detectors.shapiro_statistic(sample) == float(stats.shapiro(sample).statistic)
