"""Compiled (numba) loops for the detectors of `services.auditor.detectors`.

The near-duplicate test needs, for each new query, the nearest of the client's previous `history`
queries, skipping exact repeats. The matrix product behind the distances stays with BLAS, in float32
(twice the speed of float64, and the rows are float32 already); this kernel takes its result and
does the rest in one pass over it: the squared distance of each pair, the window of earlier queries
each row may be compared with, the repeat test and the running minimum, then computes exactly the
few pairs that may be a repeat or the nearest, so that its results are those of exact arithmetic.
Written with numpy's whole-array operations, the same steps made about eight passes over an
(n x history) matrix and its boolean masks, and cost more than the matrix product itself.

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
def _squared_difference(queries: np.ndarray, i: int, candidates: np.ndarray, j: int) -> float:
    """The exact squared distance of query i and candidate j: float32 values are exact in float64,
    summed feature by feature in order, so the result does not depend on how BLAS blocked the product."""
    exact = 0.0
    for feature in range(queries.shape[1]):
        difference = np.float64(queries[i, feature]) - np.float64(candidates[j, feature])
        exact += difference * difference
    return exact


@_jit
def nearest_earlier(
    gram: np.ndarray,
    queries: np.ndarray,
    candidates: np.ndarray,
    query_norms: np.ndarray,
    candidate_norms: np.ndarray,
    first: int,
    history: int,
    repeat_tolerance_squared: float,
    nearest_squared: np.ndarray,
    repeat: np.ndarray,
) -> None:
    """For each query i (candidate `first + i`), the exact squared distance to the nearest of the
    `history` candidates before it that is not a repeat, and whether any is a repeat.

    `queries` and `candidates` are float32 rows, `gram[i, j]` their float32 product (`queries @
    candidates.T`), the norms their squared norms in float64. A squared distance from the product,
    (|a|^2 + |b|^2) - 2 a.b, is within `slack` = (features + 2) x float32's unit roundoff x (|a|^2 +
    |b|^2) of the true one, whatever order the product summed in. The product only screens: every
    pair that may lie within the repeat tolerance is computed exactly (as the sum of its squared
    differences in float64), and so is every pair whose screened distance, less its slack, is not
    above the smallest screened distance plus its slack among the others, which is where the true
    nearest lies. Usually a handful per query: the first pass keeps the pairs that were within reach
    of the running minimum when it met them, the second computes those still within reach of the
    final one exactly. So the result is that of exact arithmetic (up to the order of the sum), the
    same whichever way the rows were chunked and whichever kernel BLAS chose for the product.
    Writes `nearest_squared[i]` (inf when no candidate is left) and `repeat[i]`.
    """
    relative_slack = (queries.shape[1] + 2) * _FLOAT32_UNIT_ROUNDOFF
    within_reach = np.empty(max(history, 1), dtype=np.int64)
    for i in range(gram.shape[0]):
        end = first + i
        start = max(0, end - history)
        norm = query_norms[i]
        upper = np.inf
        kept = 0
        repeated = False
        for j in range(start, end):
            norms = norm + candidate_norms[j]
            screened = norms - 2.0 * np.float64(gram[i, j])
            slack = relative_slack * norms
            if screened <= repeat_tolerance_squared + slack:
                exact = _squared_difference(queries, i, candidates, j)
                if exact <= repeat_tolerance_squared:
                    repeated = True
                    continue
                low = high = exact
            else:
                low, high = screened - slack, screened + slack
            if low <= upper:
                within_reach[kept] = j
                kept += 1
                if high < upper:
                    upper = high
        best = np.inf
        for k in range(kept):
            j = within_reach[k]
            norms = norm + candidate_norms[j]
            if norms - 2.0 * np.float64(gram[i, j]) - relative_slack * norms <= upper:
                exact = _squared_difference(queries, i, candidates, j)
                if repeat_tolerance_squared < exact < best:
                    best = exact
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
        rows, rows, rows, np.zeros(1), np.zeros(1), 0, 1, 0.0, np.empty(1), np.empty(1, dtype=np.bool_)
    )
    grow_members(
        np.zeros((1, 1)), np.zeros((1, 1)), 1, 0.0, np.zeros(4), np.empty(1), np.empty(1, dtype=np.int64)
    )
