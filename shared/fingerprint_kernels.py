"""Compiled (numba) row loops for the fingerprint steps of `shared.fingerprint`.

Each kernel does one pass over the batch, one row at a time, with everything a row needs (top and
runner-up class, logits, step, softmax, the label guard; or, for "fast-all-classes", the keyed hash)
kept in registers. The numpy formulation spent most of its time on the fixed cost of about fifty array
calls per batch, which at 80 rows exceeded the arithmetic several times over.

The formulas are those of the module docstring of `shared.fingerprint`, with the softmax of the shifted
logits evaluated as the shifted probabilities normalised (see `_all_classes_row`), and `log` and `exp`
from the C library where numpy may use its own SIMD routines: a returned probability can differ from a
literal numpy evaluation in its last few bits. The class signs, the base signal, the clamped step and
the labels are exact integer or comparison results and never differ.

Inputs must already be validated by the caller: C-contiguous float64 probabilities with at least two
classes (the kernels report non-finite or negative probabilities through their return value), and for
the hash, the canonical rows (float64 little-endian) with their 16-bit view.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Compiled once per machine and cached beside this file (or in NUMBA_CACHE_DIR); `warm_up` compiles at
# process start so that no request pays for it.
_jit = numba.njit(nogil=True, cache=True, boundscheck=False)

_FMIX_MULTIPLIER_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_MULTIPLIER_2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT_33 = np.uint64(33)
_SHIFT_63 = np.uint64(63)
_ZERO = np.uint64(0)


@_jit
def _top_and_second_of_row(row: np.ndarray) -> tuple[int, int]:
    """Largest and runner-up column (first index on ties), as numpy's argmax would pick them."""
    top = 0
    for column in range(1, row.shape[0]):
        if row[column] > row[top]:
            top = column
    second = 1 if top == 0 else 0
    for column in range(second + 1, row.shape[0]):
        if column != top and row[column] > row[second]:
            second = column
    return top, second


@_jit
def _valid_probabilities(probabilities: np.ndarray) -> bool:
    """Every value finite and non-negative (NaN fails both comparisons)."""
    valid = True
    for row in range(probabilities.shape[0]):
        for column in range(probabilities.shape[1]):
            value = probabilities[row, column]
            valid &= value >= 0.0 and value < np.inf
    return valid


@_jit
def _outputs(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty returned probabilities, a zero logit shift and an empty perturbation for the batch."""
    n_rows, n_classes = probabilities.shape
    return np.empty((n_rows, n_classes)), np.zeros((n_rows, n_classes)), np.empty(n_rows)


@_jit
def _normalise_keeping_top(weights: np.ndarray, top: int, out: np.ndarray) -> None:
    """out = weights / sum(weights), then any class that rounding merged with or lifted above the top
    class moved one ulp below it: argmax's first-index rule must still pick the top class."""
    n_classes = weights.shape[0]
    total = 0.0
    for column in range(n_classes):
        total += weights[column]
    for column in range(n_classes):
        out[column] = weights[column] / total
    top_probability = out[top]
    for column in range(n_classes):
        if out[column] > top_probability or (out[column] == top_probability and column < top):
            out[column] = np.nextafter(top_probability, 0.0)


@_jit
def _all_classes_row(
    probability_row: np.ndarray,
    positive: np.ndarray,
    alpha: float,
    log_epsilon: float,
    margin: float,
    weights: np.ndarray,
    out_probabilities: np.ndarray,
    out_shift: np.ndarray,
) -> float:
    """One row of the all-classes step; returns the runner-up-vs-top perturbation.

    softmax(log(p + eps) + shift) is computed as (p + eps) * exp(shift) normalised, with every class
    divided by exp(lambda * alpha): a class of sign +1 keeps p + eps, one of sign -1 gets
    (p + eps) * exp(-2 * lambda * alpha). That is one exp per row instead of a log and an exp per class,
    and it cannot overflow whatever alpha (a large step underflows to 0 instead).
    """
    n_classes = probability_row.shape[0]
    top, second = _top_and_second_of_row(probability_row)
    scale = 1.0
    if alpha > 0.0 and not positive[top]:
        # Only a class of sign +1 gains on a top class of sign -1, by 2 * alpha * lambda; lambda is the
        # largest value in [0, 1] keeping every such class MARGIN below the top class in log space.
        highest_gaining = -1.0
        for column in range(n_classes):
            if positive[column]:
                highest_gaining = max(highest_gaining, probability_row[column])
        if highest_gaining >= 0.0:
            gap = math.log(probability_row[top] + log_epsilon) - math.log(highest_gaining + log_epsilon)
            scale = min(max((gap - margin) / (alpha - -alpha), 0.0), 1.0)
    step = scale * alpha
    lowered = math.exp(-(step + step))
    for column in range(n_classes):
        if positive[column]:
            out_shift[column] = step
            weights[column] = probability_row[column] + log_epsilon
        else:
            out_shift[column] = -step
            weights[column] = (probability_row[column] + log_epsilon) * lowered
    _normalise_keeping_top(weights, top, out_probabilities)
    return out_shift[second] - out_shift[top]


@_jit
def all_classes_step(
    probabilities: np.ndarray, positive: np.ndarray, alpha: float, log_epsilon: float, margin: float
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """The all-classes step given row-major keyed signs (True for +1).

    Returns (valid, returned probabilities, logit shift, runner-up-vs-top perturbation).
    """
    fingerprinted, logit_shift, perturbation = _outputs(probabilities)
    if not _valid_probabilities(probabilities):
        return False, fingerprinted, logit_shift, perturbation
    weights = np.empty(probabilities.shape[1])
    for row in range(probabilities.shape[0]):
        perturbation[row] = _all_classes_row(
            probabilities[row],
            positive[row],
            alpha,
            log_epsilon,
            margin,
            weights,
            fingerprinted[row],
            logit_shift[row],
        )
    return True, fingerprinted, logit_shift, perturbation


@_jit
def fast_signs(
    rows: np.ndarray,
    pieces: np.ndarray,
    weights: np.ndarray,
    multipliers: np.ndarray,
    class_offsets: np.ndarray,
) -> np.ndarray:
    """Row-major (rows, classes) booleans of the "fast-all-classes" hash, True for +1.

    `rows` are the float64 rows and `pieces` their (rows, 4 * features) little-endian uint16 view;
    -0.0 counts as +0.0, as the canonical serialisation prescribes. A row's signs are
    fmix64(h + k + c * m2) >= 2**63 with h = (A * m0 + B * m1) mod 2**64.
    """
    n_rows, n_features = rows.shape
    n_classes = class_offsets.shape[0]
    positive = np.empty((n_rows, n_classes), dtype=np.bool_)
    # Flat 1-D weight rows and one loop over the pieces let LLVM vectorise the exact integer
    # projections A and B (integer sums are exact in any order).
    first_weights = weights[0]
    second_weights = weights[1]
    for row in range(n_rows):
        row_pieces = pieces[row]
        projection_a = np.uint64(0)
        projection_b = np.uint64(0)
        for index in range(row_pieces.shape[0]):
            piece = np.uint64(row_pieces[index])
            projection_a += first_weights[index] * piece
            projection_b += second_weights[index] * piece
        # -0.0 == 0.0, and the only set bit of -0.0 is the top bit of its last 16-bit piece: take back
        # what it added, leaving exactly the projections of +0.0. The branch-free count keeps the
        # common row without zeros on the vectorised path.
        zeros = 0
        for feature in range(n_features):
            zeros += rows[row, feature] == 0.0
        if zeros:
            for feature in range(n_features):
                if rows[row, feature] == 0.0:
                    piece = np.uint64(row_pieces[4 * feature + 3])
                    projection_a -= first_weights[4 * feature + 3] * piece
                    projection_b -= second_weights[4 * feature + 3] * piece
        row_hash = projection_a * multipliers[0] + projection_b * multipliers[1]
        for column in range(n_classes):
            mixed = row_hash + class_offsets[column]
            mixed ^= mixed >> _SHIFT_33
            mixed *= _FMIX_MULTIPLIER_1
            mixed ^= mixed >> _SHIFT_33
            mixed *= _FMIX_MULTIPLIER_2
            mixed ^= mixed >> _SHIFT_33
            positive[row, column] = (mixed >> _SHIFT_63) != _ZERO
    return positive


@_jit
def second_class_step(
    probabilities: np.ndarray, base: np.ndarray, alpha: float, log_epsilon: float, margin: float
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """The paper's step on the runner-up logit, kept MARGIN below the top class (as `all_classes_step`).

    softmax with the runner-up's logit moved by `step` is (p + eps) normalised with the runner-up's
    weight multiplied by exp(step).
    """
    fingerprinted, logit_shift, perturbation = _outputs(probabilities)
    if not _valid_probabilities(probabilities):
        return False, fingerprinted, logit_shift, perturbation
    n_rows, n_classes = probabilities.shape
    weights = np.empty(n_classes)
    for row in range(n_rows):
        probability_row = probabilities[row]
        top, second = _top_and_second_of_row(probability_row)
        gap = math.log(probability_row[top] + log_epsilon) - math.log(probability_row[second] + log_epsilon)
        step = min(alpha * base[row], gap - margin)
        for column in range(n_classes):
            weights[column] = probability_row[column] + log_epsilon
        weights[second] = weights[second] * math.exp(step)
        perturbation[row] = step
        logit_shift[row, second] = step
        _normalise_keeping_top(weights, top, fingerprinted[row])
    return True, fingerprinted, logit_shift, perturbation


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the schemes pass.

    Called when a worker process starts, so that the first request does not wait about two seconds for
    the compiler.
    """
    probabilities = np.full((1, 2), 0.5)
    rows = np.zeros((1, 1))
    weights = np.zeros((2, 4), dtype=np.uint64)
    multipliers = np.ones(2, dtype=np.uint64)
    class_offsets = np.zeros(2, dtype=np.uint64)
    positive = np.zeros((1, 2), dtype=np.bool_)
    pieces = rows.view("<u2")
    all_classes_step(probabilities, positive, 0.1, 1e-8, 1e-6)
    second_class_step(probabilities, np.zeros(1), 0.1, 1e-8, 1e-6)
    fast_signs(rows, pieces, weights, multipliers, class_offsets)
