"""Compiled (numba) loops for the detectors of `services.auditor.detectors`.

The near-duplicate test needs, for each new query, the nearest of the client's previous `history`
queries, skipping exact repeats. The matrix product behind the distances stays with BLAS, in float32
(twice the speed of float64, and the rows are float32 already); this kernel takes its result and
does the rest in one pass over it: the squared distance of each pair, the window of earlier queries
each row may be compared with, an exact recomputation of the pairs near a decision, the repeat test
and the running minimum. Written with numpy's whole-array operations, the same steps made about
eight passes over an (n x history) matrix and its boolean masks, and cost more than the matrix
product itself.

PRADA's growing-set rule (`grow_members`) keeps the arithmetic of `detectors.squared_distances` in
the same order ((|a|^2 + |b|^2) - 2 a.b, then clamped at 0), so its results are bit for bit those of
the numpy formulation (tested).
"""

from __future__ import annotations

import numba
import numpy as np

# Compiled once per machine and cached beside this file (or in NUMBA_CACHE_DIR); `warm_up` compiles at
# worker start so that no scoring job pays for it.
_jit = numba.njit(nogil=True, cache=True, boundscheck=False)


# Unit roundoff of float32: the float32 product's error bound below is a multiple of it.
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24


@_jit
def nearest_earlier(
    gram: np.ndarray,
    queries: np.ndarray,
    candidates: np.ndarray,
    query_norms: np.ndarray,
    candidate_norms: np.ndarray,
    first: int,
    history: int,
    exact_below: float,
    repeat_tolerance_squared: float,
    nearest_squared: np.ndarray,
    repeat: np.ndarray,
) -> None:
    """For each query i (candidate `first + i`), the nearest of the `history` candidates before it.

    `queries` and `candidates` are float32 rows, `gram[i, j]` their float32 product (`queries @
    candidates.T`), the norms their squared norms in float64. A squared distance from the product,
    (|a|^2 + |b|^2) - 2 a.b, is within `slack` = (features + 2) x float32's unit roundoff x (|a|^2 +
    |b|^2) of the true one, whatever order the product summed in. Every pair that may lie within
    `exact_below` (the caller's decision threshold, squared) or the repeat tolerance is computed
    again exactly, as the sum of its squared differences in float64 (a float32 row's values are
    exact in float64): repeats, and any decision against `exact_below`, are those of exact
    arithmetic; a larger distance is off by at most the slack (about 1e-6 of it). Writes the
    smallest squared distance above the repeat tolerance to `nearest_squared[i]` (inf when there is
    none) and whether any candidate in the window lies within the tolerance to `repeat[i]`.
    """
    features = queries.shape[1]
    relative_slack = (features + 2) * _FLOAT32_UNIT_ROUNDOFF
    refine_below = max(exact_below, repeat_tolerance_squared)
    for i in range(gram.shape[0]):
        end = first + i
        start = max(0, end - history)
        norm = query_norms[i]
        best = np.inf
        repeated = False
        for j in range(start, end):
            norms = norm + candidate_norms[j]
            distance = norms - 2.0 * np.float64(gram[i, j])
            if distance <= refine_below + relative_slack * norms:
                exact = 0.0
                for feature in range(features):
                    difference = np.float64(queries[i, feature]) - np.float64(candidates[j, feature])
                    exact += difference * difference
                distance = exact
                if distance <= repeat_tolerance_squared:
                    repeated = True
                    continue
            if distance < best:
                best = distance
        nearest_squared[i] = best
        repeat[i] = repeated


@_jit
def grow_members(
    to_old: np.ndarray,
    to_new: np.ndarray,
    max_members: int,
    repeat_tolerance: float,
    running: np.ndarray,
    d_out: np.ndarray,
    joined: np.ndarray,
) -> tuple[int, int, int, int]:
    """PRADA's growing-set rule for one class's new queries, in order (`PradaDetector._grow_class`).

    `to_old[i, j]` is the squared distance of new query i to stored member j, `to_new[i, k]` that to new
    query k. `running` holds the class's join count, mean, M2 and threshold T and is updated in place.
    Writes each query's distance to its nearest active member to `d_out[i]` (left as is for the first
    member and for repeats) and the indices of the queries that joined to `joined`. Returns the number
    of repeats, of joined queries, and the first stored and first joined member still active (members
    before them were evicted, oldest first, beyond `max_members`).

    The same operations in the same order as the Python loop it replaced, so the results are equal bit
    for bit (tested); compiled, it skips a numpy call per query and member set.
    """
    n_old = to_old.shape[1]
    count, mean, m2, threshold = int(running[0]), running[1], running[2], running[3]
    n_joined = old_start = joined_start = repeats = 0
    for i in range(to_new.shape[0]):
        active = (n_old - old_start) + (n_joined - joined_start)
        if active == 0:
            d = 0.0  # the first member of the class: its 0 enters the join statistics, not D
        else:
            squared = np.inf
            for j in range(old_start, n_old):
                if to_old[i, j] < squared:
                    squared = to_old[i, j]
            for k in range(joined_start, n_joined):
                if to_new[i, joined[k]] < squared:
                    squared = to_new[i, joined[k]]
            d = np.sqrt(squared)
            if d <= repeat_tolerance:
                repeats += 1
                continue
            d_out[i] = d
        if active == 0 or d > threshold:
            joined[n_joined] = i
            n_joined += 1
            count += 1
            step = d - mean
            mean += step / count
            m2 += step * (d - mean)
            threshold = max(threshold, mean - np.sqrt(m2 / count))
            if active + 1 > max_members:  # FIFO: the oldest member leaves
                if old_start < n_old:
                    old_start += 1
                else:
                    joined_start += 1
    running[0], running[1], running[2], running[3] = count, mean, m2, threshold
    return repeats, n_joined, old_start, joined_start


def warm_up() -> None:
    """Compile (or load from the cache) the kernels for the argument types the detectors pass."""
    rows = np.zeros((1, 1), dtype=np.float32)
    nearest_earlier(
        rows, rows, rows, np.zeros(1), np.zeros(1), 0, 1, 0.0, 0.0, np.empty(1), np.empty(1, dtype=np.bool_)
    )
    grow_members(
        np.zeros((1, 1)), np.zeros((1, 1)), 1, 0.0, np.zeros(4), np.empty(1), np.empty(1, dtype=np.int64)
    )
