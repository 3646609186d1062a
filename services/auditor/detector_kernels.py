"""Compiled (numba) loops for the detectors of `services.auditor.detectors`.

The near-duplicate test needs, for each new query, the nearest of the client's previous `history`
queries, skipping exact repeats. The matrix product behind the distances stays with BLAS; this kernel
takes its result and does the rest in one pass over it: the squared distance of each pair, the window
of earlier queries each row may be compared with, the repeat test and the running minimum. Written with
numpy's whole-array operations, the same steps made about eight passes over an (n x history) matrix and
its boolean masks, and cost more than the matrix product itself.

The arithmetic is that of `detectors.squared_distances` in the same order ((|a|^2 + |b|^2) - 2 a.b,
then clamped at 0), so the results are bit for bit those of the numpy formulation (tested).
"""

from __future__ import annotations

import numba
import numpy as np

# Compiled once per machine and cached beside this file (or in NUMBA_CACHE_DIR); `warm_up` compiles at
# worker start so that no scoring job pays for it.
_jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@_jit
def nearest_earlier(
    gram: np.ndarray,
    query_norms: np.ndarray,
    candidate_norms: np.ndarray,
    first: int,
    history: int,
    repeat_tolerance_squared: float,
    nearest_squared: np.ndarray,
    repeat: np.ndarray,
) -> None:
    """For each query i (candidate `first + i`), the nearest of the `history` candidates before it.

    `gram[i, j]` is the dot product of query i and candidate j, the norms are squared norms. Writes the
    smallest squared distance above the repeat tolerance to `nearest_squared[i]` (inf when there is
    none) and whether any candidate in the window lies within the tolerance to `repeat[i]`.
    """
    for i in range(gram.shape[0]):
        end = first + i
        start = max(0, end - history)
        norm = query_norms[i]
        best = np.inf
        repeated = False
        for j in range(start, end):
            distance = (norm + candidate_norms[j]) - 2.0 * gram[i, j]
            if distance < 0.0:
                distance = 0.0
            if distance <= repeat_tolerance_squared:
                repeated = True
            elif distance < best:
                best = distance
        nearest_squared[i] = best
        repeat[i] = repeated


def warm_up() -> None:
    """Compile (or load from the cache) the kernels for the argument types the detectors pass."""
    nearest_earlier(
        np.zeros((1, 1)), np.zeros(1), np.zeros(1), 0, 1, 0.0, np.empty(1), np.empty(1, dtype=np.bool_)
    )
