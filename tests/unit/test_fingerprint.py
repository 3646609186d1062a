"""Unit tests for shared.fingerprint: canonical row bytes, the HMAC base signal and the schemes."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from services.auditor.scanstats import SuspectAnswers, _watermark_replay_test
from shared.fingerprint import (
    DEFAULT_ALL_CLASSES_ALPHA,
    DEFAULT_SCHEME,
    MARGIN,
    SCHEMES,
    FastAllClassesScheme,
    FingerprintResult,
    HmacAllClassesScheme,
    HmacSecondClassScheme,
    NoFingerprintScheme,
    canonical_messages,
    canonical_row_bytes,
    fast_class_signs,
    get_scheme,
    hmac_base,
    hmac_class_signs,
    row_digests,
    second_vs_top_log_ratio,
)

KEY = b"modelprint-unit-test-key-A"
OTHER_KEY = b"modelprint-unit-test-key-B"
ALPHA = 0.08
EPSILON = 1e-8
N_FEATURES = 5
HEADER_TAG = b"modelprint.v1\x00"


def _random_inputs(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    return rng.normal(size=(n_rows, N_FEATURES))


def _paper_base_scalar(row: np.ndarray, key: bytes) -> float:
    """The paper's Algorithm 1 for one row, with the message built independently of the module."""
    message = HEADER_TAG + struct.pack("<I", row.size) + struct.pack(f"<{row.size}d", *row.tolist())
    fingerprint_int = int(hmac.new(key, message, hashlib.sha256).hexdigest()[:8], 16)
    return (fingerprint_int % 10**6) / 250000 - 2.0


def _top_and_second(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top = np.argmax(probabilities, axis=1)
    masked = probabilities.copy()
    masked[np.arange(len(masked)), top] = -np.inf
    return top, np.argmax(masked, axis=1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def _paper_unbounded_step(probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> np.ndarray:
    """The paper's step as published: add alpha * base to the runner-up's logit with no bound."""
    rows = np.arange(len(probabilities))
    _, second = _top_and_second(probabilities)
    logits = np.log(probabilities + EPSILON)
    logits[rows, second] += ALPHA * hmac_base(inputs, key)
    return _softmax(logits)


def _bounded_step_without_rounding_guard(
    probabilities: np.ndarray, inputs: np.ndarray, key: bytes
) -> np.ndarray:
    """The bounded step, but without the scheme's final guard against rounding merging near-tied classes."""
    rows = np.arange(len(probabilities))
    top, second = _top_and_second(probabilities)
    logits = np.log(probabilities + EPSILON)
    gap = logits[rows, top] - logits[rows, second]
    logits[rows, second] += np.minimum(ALPHA * hmac_base(inputs, key), gap - MARGIN)
    return _softmax(logits)


# ---------------------------------------------------------------------------------------------------------
# Probability batches for the label-preservation test. Each builder returns an (n, n_classes) array whose
# rows sum to about 1, with classes shuffled per row so ties and near-ties sit at every index.


def _shuffled(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    return rng.permuted(probabilities, axis=1)


def _fill_rest(rng: np.random.Generator, n_rows: int, n_rest: int, mass: np.ndarray) -> np.ndarray:
    if n_rest == 0:
        return np.zeros((n_rows, 0))
    return rng.dirichlet(np.ones(n_rest), size=n_rows) * mass[:, None]


def _dirichlet_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    return rng.dirichlet(np.ones(n_classes), size=n_rows)


def _sparse_dirichlet_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    # A tiny concentration puts most of the mass on one class and leaves values down to ~1e-300 or 0.
    return rng.dirichlet(np.full(n_classes, 0.05), size=n_rows)


def _near_tie_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    gap = 10.0 ** rng.uniform(-12, -3, size=n_rows)
    if n_classes == 2:
        top = (1.0 + gap) / 2.0
    else:
        # Top above 0.35 leaves at most 0.3 + gap for the rest, so the runner-up is the second largest.
        top = rng.uniform(0.35, 0.5, size=n_rows)
    second = top - gap
    rest = _fill_rest(rng, n_rows, n_classes - 2, 1.0 - top - second)
    return _shuffled(rng, np.column_stack([top, second, rest]))


def _exact_tie_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    tied = np.full(n_rows, 0.5) if n_classes == 2 else rng.uniform(0.35, 0.5, size=n_rows)
    rest = _fill_rest(rng, n_rows, n_classes - 2, 1.0 - 2.0 * tied)
    return _shuffled(rng, np.column_stack([tied, tied, rest]))


def _three_way_tie_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    tied = np.full(n_rows, 1.0 / 3.0) if n_classes == 3 else rng.uniform(0.26, 1.0 / 3.0, size=n_rows)
    rest = _fill_rest(rng, n_rows, n_classes - 3, 1.0 - 3.0 * tied)
    return _shuffled(rng, np.column_stack([tied, tied, tied, rest]))


def _ulp_tie_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    # Two classes tied and a third a few ulps above them: float rounding inside the softmax can merge the
    # untouched tied class with the top one, which must not hand it the label when it has the lower index.
    tied = rng.uniform(0.3, 0.33, size=n_rows)
    top = tied.copy()
    for _ in range(3):
        step_up = rng.random(n_rows) < 0.7
        top[step_up] = np.nextafter(top[step_up], 1.0)
    top = np.where(top == tied, np.nextafter(tied, 1.0), top)
    rest = _fill_rest(rng, n_rows, n_classes - 3, 1.0 - 2.0 * tied - top)
    return _shuffled(rng, np.column_stack([tied, tied, top, rest]))


def _one_hot_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[rng.integers(n_classes, size=n_rows)]


def _near_zero_rows(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    tiny = 10.0 ** rng.uniform(-300, -9, size=(n_rows, n_classes - 1))
    tiny[rng.random(tiny.shape) < 0.3] = 0.0
    return _shuffled(rng, np.column_stack([1.0 - tiny.sum(axis=1), tiny]))


# (builder, rows per class count, smallest class count it supports)
ROW_BUILDERS = {
    "dirichlet": (_dirichlet_rows, 4_000, 2),
    "sparse-dirichlet": (_sparse_dirichlet_rows, 3_000, 2),
    "near-tie": (_near_tie_rows, 6_000, 2),
    "exact-tie": (_exact_tie_rows, 3_000, 2),
    "three-way-tie": (_three_way_tie_rows, 2_000, 3),
    "ulp-tie": (_ulp_tie_rows, 1_000, 3),
    "one-hot": (_one_hot_rows, 400, 2),
    "near-zero": (_near_zero_rows, 1_200, 2),
}


def _label_test_batches() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(kind, probabilities, inputs) batches over 2-6 classes, 100,000 rows in all, from a fixed seed."""
    rng = np.random.default_rng(20240611)
    batches = []
    for kind, (build, n_rows, min_classes) in ROW_BUILDERS.items():
        for n_classes in range(min_classes, 7):
            probabilities = build(rng, n_rows, n_classes)
            batches.append((kind, probabilities, _random_inputs(rng, n_rows)))
    return batches


@pytest.fixture(scope="module")
def label_test_batches() -> list[tuple[str, np.ndarray, np.ndarray]]:
    return _label_test_batches()


# ---------------------------------------------------------------------------------------------------------
# Canonical serialisation


def test_canonical_row_bytes_has_the_documented_layout() -> None:
    row = np.array([1.5, -2.0, 0.1, 1e-300])
    expected = HEADER_TAG + struct.pack("<I", 4) + struct.pack("<4d", 1.5, -2.0, 0.1, 1e-300)
    assert canonical_row_bytes(row) == expected
    assert len(expected) == 14 + 4 + 4 * 8


def test_negative_zero_serialises_like_positive_zero_without_touching_the_caller_array() -> None:
    with_negative_zero = np.array([[-0.0, 1.0, -0.0], [2.0, -0.0, 3.0]])
    with_positive_zero = np.abs(with_negative_zero)
    assert canonical_messages(with_negative_zero) == canonical_messages(with_positive_zero)
    assert canonical_row_bytes(np.array([-0.0])) == HEADER_TAG + struct.pack("<I", 1) + struct.pack("<d", 0.0)
    np.testing.assert_array_equal(hmac_base(with_negative_zero, KEY), hmac_base(with_positive_zero, KEY))
    assert np.signbit(with_negative_zero[0, 0])


def test_float32_inputs_serialise_as_their_exact_float64_value() -> None:
    row32 = np.array([0.1, 1.0 / 3.0, -7.25, 3e-5], dtype=np.float32)
    expected = HEADER_TAG + struct.pack("<I", 4) + struct.pack("<4d", *(float(value) for value in row32))
    assert canonical_row_bytes(row32.astype(np.float64)) == expected
    assert canonical_messages(row32[None, :]) == [expected]
    # Widening is not a no-op: the float64 literals have different bytes, so the test can tell them apart.
    assert canonical_row_bytes(np.array([0.1, 1.0 / 3.0, -7.25, 3e-5])) != expected


def test_canonical_messages_do_not_depend_on_memory_layout_or_byte_order() -> None:
    rng = np.random.default_rng(1)
    inputs = _random_inputs(rng, 7)
    expected = [
        HEADER_TAG + struct.pack("<I", N_FEATURES) + struct.pack(f"<{N_FEATURES}d", *row.tolist())
        for row in inputs
    ]
    assert canonical_messages(inputs) == expected
    assert canonical_messages(np.asfortranarray(inputs)) == expected
    assert canonical_messages(inputs.astype(">f8")) == expected
    wider = np.column_stack([inputs, np.zeros((7, 3))])
    assert canonical_messages(wider[:, :N_FEATURES]) == expected
    assert [canonical_row_bytes(row) for row in inputs] == expected


def test_canonical_serialisation_rejects_wrong_dimensions() -> None:
    with pytest.raises(ValueError, match="2-D"):
        canonical_messages(np.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        canonical_row_bytes(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------------------
# HMAC base signal


def test_hmac_base_is_deterministic_per_key_and_input() -> None:
    inputs = _random_inputs(np.random.default_rng(2), 500)
    first = hmac_base(inputs, KEY)
    np.testing.assert_array_equal(first, hmac_base(inputs.copy(), KEY))
    assert first.shape == (500,)
    assert first.dtype == np.float64


def test_hmac_base_changes_with_the_key() -> None:
    inputs = _random_inputs(np.random.default_rng(3), 1_000)
    fraction_equal = np.mean(hmac_base(inputs, KEY) == hmac_base(inputs, OTHER_KEY))
    assert fraction_equal < 0.01


def test_hmac_base_matches_the_papers_scalar_formula() -> None:
    inputs = _random_inputs(np.random.default_rng(4), 200)
    expected = np.array([_paper_base_scalar(row, KEY) for row in inputs])
    np.testing.assert_array_equal(hmac_base(inputs, KEY), expected)


def test_hmac_base_is_uniform_on_minus_two_to_two() -> None:
    base = hmac_base(_random_inputs(np.random.default_rng(5), 20_000), KEY)
    assert base.min() >= -2.0
    assert base.max() < 2.0
    assert stats.kstest(base, "uniform", args=(-2.0, 4.0)).pvalue > 0.001
    assert abs(base.mean()) < 0.05


def test_hmac_base_rejects_an_empty_key() -> None:
    with pytest.raises(ValueError, match="key"):
        hmac_base(np.zeros((2, 3)), b"")


# ---------------------------------------------------------------------------------------------------------
# HmacSecondClassScheme: the top-1 label never changes


def test_top1_label_is_preserved_on_100k_rows_including_near_ties(
    label_test_batches: list[tuple[str, np.ndarray, np.ndarray]],
) -> None:
    scheme = HmacSecondClassScheme(alpha=ALPHA)
    assert sum(len(probabilities) for _, probabilities, _ in label_test_batches) >= 100_000
    for kind, probabilities, inputs in label_test_batches:
        result = scheme.apply(probabilities, inputs, KEY)
        returned = result.probabilities
        context = f"{kind} rows with {probabilities.shape[1]} classes"
        assert returned.shape == probabilities.shape, context
        assert returned.dtype == np.float64, context
        np.testing.assert_array_equal(np.argmax(returned, axis=1), np.argmax(probabilities, axis=1), context)
        np.testing.assert_allclose(returned.sum(axis=1), 1.0, rtol=0, atol=1e-9, err_msg=context)
        assert returned.min() >= 0.0, context
        assert returned.max() <= 1.0, context
        assert result.perturbation.shape == (len(probabilities),), context
        assert np.all(result.perturbation <= ALPHA * hmac_base(inputs, KEY)), context


def test_papers_unbounded_step_flips_labels_on_near_ties(
    label_test_batches: list[tuple[str, np.ndarray, np.ndarray]],
) -> None:
    flipped_rows = 0
    near_tie_rows = 0
    for kind, probabilities, inputs in label_test_batches:
        if kind != "near-tie":
            continue
        unbounded = _paper_unbounded_step(probabilities, inputs, KEY)
        flipped_rows += int(np.sum(np.argmax(unbounded, axis=1) != np.argmax(probabilities, axis=1)))
        near_tie_rows += len(probabilities)
    # About half of the base values are positive, and any positive step beats a gap of at most ~2e-3.
    assert flipped_rows > 0.3 * near_tie_rows


def test_rounding_guard_keeps_label_when_an_untouched_class_is_ulps_below_the_top() -> None:
    # Class 1 is tied with the runner-up (class 0) and one ulp below the top (class 2); only class 0 is
    # perturbed, yet rounding in log(p + 1e-8) alone makes class 1 equal to class 2 in about a quarter of
    # the rows, and argmax then picks class 1 for its lower index.
    rng = np.random.default_rng(6)
    tied = rng.uniform(0.2, 0.33, size=5_000)
    top = np.nextafter(tied, 1.0)
    probabilities = np.column_stack([tied, tied, top])
    inputs = _random_inputs(rng, len(probabilities))
    unguarded = _bounded_step_without_rounding_guard(probabilities, inputs, KEY)
    assert np.any(np.argmax(unguarded, axis=1) != 2), "rows no longer exercise the rounding merge"
    result = HmacSecondClassScheme(alpha=ALPHA).apply(probabilities, inputs, KEY)
    np.testing.assert_array_equal(np.argmax(result.probabilities, axis=1), 2)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "tied_row",
    [[0.5, 0.5], [0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.4, 0.2, 0.4], [0.25, 0.25, 0.25, 0.25]],
)
def test_exact_ties_keep_the_first_index_and_open_a_margin_below_it(tied_row: list[float]) -> None:
    probabilities = np.tile(tied_row, (500, 1))
    inputs = _random_inputs(np.random.default_rng(10), len(probabilities))
    result = HmacSecondClassScheme(alpha=ALPHA).apply(probabilities, inputs, KEY)
    top, second = _top_and_second(probabilities)
    rows = np.arange(len(probabilities))
    np.testing.assert_array_equal(np.argmax(result.probabilities, axis=1), top)
    assert np.all(result.perturbation <= -1e-6)
    # Half the rows draw a positive step, which the bound turns into exactly the 1e-6 margin.
    returned_log_gap = np.log(result.probabilities[rows, top]) - np.log(result.probabilities[rows, second])
    assert returned_log_gap.min() > 0.999e-6
    assert np.mean(np.abs(result.perturbation + 1e-6) < 1e-12) > 0.3


def test_bounded_perturbation_is_the_smaller_of_step_and_gap_minus_margin(
    label_test_batches: list[tuple[str, np.ndarray, np.ndarray]],
) -> None:
    _, probabilities, inputs = next(batch for batch in label_test_batches if batch[0] == "near-tie")
    rows = np.arange(len(probabilities))
    top, second = _top_and_second(probabilities)
    logits = np.log(probabilities + EPSILON)
    gap = logits[rows, top] - logits[rows, second]
    result = HmacSecondClassScheme(alpha=ALPHA).apply(probabilities, inputs, KEY)
    expected = np.minimum(ALPHA * hmac_base(inputs, KEY), gap - MARGIN)
    np.testing.assert_allclose(result.perturbation, expected, rtol=0, atol=1e-12)
    # On near-ties the bound is what decides for every row with a positive step.
    assert np.any(result.perturbation < ALPHA * hmac_base(inputs, KEY))


# ---------------------------------------------------------------------------------------------------------
# HmacSecondClassScheme: the fingerprint is actually applied


def _well_separated_rows(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    # Log-gaps of about 1 between top and runner-up and 1.5 below it: far above the largest step, 0.16.
    logits = np.array([0.0, -1.0, -2.5, -4.0]) + rng.uniform(-0.1, 0.1, size=(n_rows, 4))
    return _shuffled(rng, _softmax(logits))


@pytest.fixture(scope="module")
def well_separated() -> tuple[np.ndarray, np.ndarray, FingerprintResult]:
    rng = np.random.default_rng(7)
    probabilities = _well_separated_rows(rng, 20_000)
    inputs = _random_inputs(rng, len(probabilities))
    return probabilities, inputs, HmacSecondClassScheme(alpha=ALPHA).apply(probabilities, inputs, KEY)


def test_well_separated_rows_get_the_full_alpha_times_base(
    well_separated: tuple[np.ndarray, np.ndarray, FingerprintResult],
) -> None:
    _, inputs, result = well_separated
    np.testing.assert_allclose(result.perturbation, ALPHA * hmac_base(inputs, KEY), rtol=0, atol=1e-12)


def test_returned_log_ratio_moves_by_the_applied_perturbation(
    well_separated: tuple[np.ndarray, np.ndarray, FingerprintResult],
) -> None:
    probabilities, _, result = well_separated
    shift = second_vs_top_log_ratio(result.probabilities) - second_vs_top_log_ratio(probabilities)
    # The 1e-8 epsilon inside the logs is negligible against probabilities of a few percent or more.
    np.testing.assert_allclose(shift, result.perturbation, rtol=0, atol=1e-6)
    assert np.std(shift) > 0.05


def test_perturbation_on_well_separated_rows_is_centred_and_spans_plus_minus_two_alpha(
    well_separated: tuple[np.ndarray, np.ndarray, FingerprintResult],
) -> None:
    perturbation = well_separated[2].perturbation
    assert abs(perturbation.mean()) < 0.005
    assert perturbation.min() >= -2 * ALPHA
    assert perturbation.max() < 2 * ALPHA
    assert perturbation.min() < -2 * ALPHA + 0.001
    assert perturbation.max() > 2 * ALPHA - 0.001


def test_apply_on_clean_probabilities_recomputes_the_same_result(
    well_separated: tuple[np.ndarray, np.ndarray, FingerprintResult],
) -> None:
    probabilities, inputs, result = well_separated
    again = HmacSecondClassScheme(alpha=ALPHA).apply(probabilities.copy(), inputs.copy(), KEY)
    np.testing.assert_array_equal(again.probabilities, result.probabilities)
    np.testing.assert_array_equal(again.perturbation, result.perturbation)
    other_key = HmacSecondClassScheme(alpha=ALPHA).apply(probabilities, inputs, OTHER_KEY)
    assert not np.array_equal(other_key.perturbation, result.perturbation)


def test_two_class_rows_are_fingerprinted() -> None:
    rng = np.random.default_rng(8)
    top = rng.uniform(0.7, 0.95, size=2_000)
    probabilities = _shuffled(rng, np.column_stack([top, 1.0 - top]))
    inputs = _random_inputs(rng, len(probabilities))
    result = HmacSecondClassScheme(alpha=ALPHA).apply(probabilities, inputs, KEY)
    np.testing.assert_allclose(result.perturbation, ALPHA * hmac_base(inputs, KEY), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.argmax(result.probabilities, axis=1), np.argmax(probabilities, axis=1))
    shift = second_vs_top_log_ratio(result.probabilities) - second_vs_top_log_ratio(probabilities)
    np.testing.assert_allclose(shift, result.perturbation, rtol=0, atol=1e-6)


def test_second_vs_top_log_ratio_uses_first_index_on_ties() -> None:
    three_classes = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4], [0.6, 0.1, 0.3]])
    expected = np.log(np.array([0.3, 0.4, 0.3]) + EPSILON) - np.log(np.array([0.5, 0.4, 0.6]) + EPSILON)
    np.testing.assert_allclose(second_vs_top_log_ratio(three_classes), expected, rtol=0, atol=1e-15)
    four_way_tie = np.array([[0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_array_equal(second_vs_top_log_ratio(four_way_tie), [0.0])


# ---------------------------------------------------------------------------------------------------------
# Baseline, registry and validation


def test_no_fingerprint_scheme_returns_the_probabilities_unchanged() -> None:
    rng = np.random.default_rng(9)
    probabilities = rng.dirichlet(np.ones(4), size=100).astype(np.float32)
    result = NoFingerprintScheme().apply(probabilities, _random_inputs(rng, 100), KEY)
    assert result.probabilities.dtype == np.float64
    np.testing.assert_array_equal(result.probabilities, probabilities.astype(np.float64))
    np.testing.assert_array_equal(result.perturbation, np.zeros(100))
    float64_probabilities = probabilities.astype(np.float64)
    copied = NoFingerprintScheme().apply(float64_probabilities, np.zeros((100, 1)), KEY).probabilities
    assert not np.shares_memory(copied, float64_probabilities)


def test_get_scheme_builds_registered_schemes() -> None:
    hmac_scheme = get_scheme("hmac-second-class", alpha=0.05)
    assert isinstance(hmac_scheme, HmacSecondClassScheme)
    assert hmac_scheme.name == "hmac-second-class"
    assert hmac_scheme.alpha == 0.05
    default_strength = get_scheme("hmac-second-class")
    assert isinstance(default_strength, HmacSecondClassScheme)
    assert default_strength.alpha == ALPHA
    assert isinstance(get_scheme("none"), NoFingerprintScheme)
    assert get_scheme("none").name == "none"
    all_classes = get_scheme("hmac-all-classes")
    assert isinstance(all_classes, HmacAllClassesScheme)
    assert all_classes.alpha == DEFAULT_ALL_CLASSES_ALPHA
    assert DEFAULT_SCHEME == "hmac-all-classes"
    fast = get_scheme("fast-all-classes")
    assert isinstance(fast, FastAllClassesScheme)
    assert fast.alpha == DEFAULT_ALL_CLASSES_ALPHA
    assert get_scheme("fast-all-classes", alpha=0.1).alpha == 0.1
    assert set(SCHEMES) == {"fast-all-classes", "hmac-all-classes", "hmac-second-class", "none"}


def test_get_scheme_rejects_unknown_names() -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"unknown fingerprint scheme 'x'; "
            r"known: fast-all-classes, hmac-all-classes, hmac-second-class, none"
        ),
    ):
        get_scheme("x")


@pytest.mark.parametrize("alpha", [-0.01, float("nan"), float("inf")])
def test_hmac_scheme_rejects_invalid_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        HmacSecondClassScheme(alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        HmacAllClassesScheme(alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        FastAllClassesScheme(alpha=alpha)


@pytest.mark.parametrize(
    "scheme",
    [HmacAllClassesScheme(), HmacSecondClassScheme(), FastAllClassesScheme(), NoFingerprintScheme()],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize(
    ("probabilities", "inputs", "message"),
    [
        (np.array([0.3, 0.7]), np.zeros((1, 2)), "2-D"),
        (np.ones((3, 1)), np.zeros((3, 2)), "at least 2 classes"),
        (np.full((3, 2), 0.5), np.zeros((4, 2)), "same number of rows"),
        (np.full((3, 2), 0.5), np.zeros(3), "inputs must be a 2-D"),
        (np.array([[0.5, np.nan]]), np.zeros((1, 2)), "finite"),
        (np.array([[1.1, -0.1]]), np.zeros((1, 2)), "non-negative"),
    ],
    ids=["1-d", "one-class", "row-mismatch", "1-d-inputs", "nan", "negative"],
)
def test_schemes_validate_shapes_and_values(
    scheme: HmacAllClassesScheme | HmacSecondClassScheme | FastAllClassesScheme | NoFingerprintScheme,
    probabilities: np.ndarray,
    inputs: np.ndarray,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        scheme.apply(probabilities, inputs, KEY)


# ---------------------------------------------------------------------------------------------------------
# HmacAllClassesScheme: a keyed sign step on every class's logit, label preserved


def test_class_signs_follow_the_documented_digest_bits() -> None:
    rng = np.random.default_rng(5)
    inputs = _random_inputs(rng, 7)
    signs = hmac_class_signs(inputs, 300, KEY)
    assert signs.shape == (7, 300)
    for row, message in zip(signs, canonical_messages(inputs), strict=True):
        stream = hmac.digest(KEY, message, "sha256") + hmac.digest(
            KEY, message + (1).to_bytes(4, "little"), "sha256"
        )
        expected = [1.0 if stream[c // 8] >> (7 - c % 8) & 1 else -1.0 for c in range(300)]
        np.testing.assert_array_equal(row, expected)
    np.testing.assert_array_equal(hmac_class_signs(inputs, 4, KEY), signs[:, :4])
    assert not np.array_equal(hmac_class_signs(inputs, 300, OTHER_KEY), signs)
    with pytest.raises(ValueError, match="empty"):
        hmac_class_signs(inputs, 4, b"")


def test_class_signs_are_balanced_and_independent_across_classes() -> None:
    signs = hmac_class_signs(_random_inputs(np.random.default_rng(6), 20_000), 4, KEY)
    # Each class: share of +1 within 4 standard errors of 1/2; classes uncorrelated.
    assert np.all(np.abs((signs > 0).mean(axis=0) - 0.5) < 4 * 0.5 / np.sqrt(20_000))
    correlation = np.corrcoef(signs.T)[np.triu_indices(4, 1)]
    assert np.all(np.abs(correlation) < 4 / np.sqrt(20_000))


@pytest.mark.parametrize(
    ("scheme", "class_signs"),
    [
        (HmacAllClassesScheme(alpha=0.5), hmac_class_signs),
        (FastAllClassesScheme(alpha=0.5), lambda inputs, n, key: _fast_signs(inputs, n, key)),
    ],
    ids=["hmac", "fast"],
)
def test_all_classes_schemes_keep_every_label_on_100k_rows_including_near_ties(
    label_test_batches: list[tuple[str, np.ndarray, np.ndarray]],
    scheme: HmacAllClassesScheme | FastAllClassesScheme,
    class_signs: Callable[[np.ndarray, int, bytes], np.ndarray],
) -> None:
    for kind, probabilities, inputs in label_test_batches:
        result = scheme.apply(probabilities, inputs, KEY)
        returned = result.probabilities
        context = f"{kind} rows with {probabilities.shape[1]} classes"
        np.testing.assert_array_equal(np.argmax(returned, axis=1), np.argmax(probabilities, axis=1), context)
        np.testing.assert_allclose(returned.sum(axis=1), 1.0, rtol=0, atol=1e-9, err_msg=context)
        assert returned.min() >= 0.0, context
        # The step never exceeds alpha on any class, and has the keyed sign wherever it is not shrunk to 0.
        shift = result.logit_shift
        assert shift.shape == probabilities.shape, context
        assert np.all(np.abs(shift) <= 0.5 + 1e-12), context
        signs = class_signs(inputs, probabilities.shape[1], KEY)
        assert np.all((shift == 0) | (np.sign(shift) == signs)), context
        rows = np.arange(len(probabilities))
        top, second = _top_and_second(probabilities)
        np.testing.assert_array_equal(result.perturbation, shift[rows, second] - shift[rows, top], context)


def test_all_classes_scheme_applies_the_full_step_on_well_separated_rows() -> None:
    rng = np.random.default_rng(8)
    inputs = _random_inputs(rng, 500)
    probabilities = _softmax(np.column_stack([np.full(500, 6.0), rng.uniform(-2, 0, size=(500, 3))]))
    result = HmacAllClassesScheme(alpha=0.2).apply(probabilities, inputs, KEY)
    np.testing.assert_allclose(result.logit_shift, 0.2 * hmac_class_signs(inputs, 4, KEY), rtol=0, atol=1e-12)
    # Returned logits (up to the softmax constant) moved by exactly the shift.
    moved = np.log(result.probabilities) - np.log(probabilities + EPSILON)
    centred = moved - moved.mean(axis=1, keepdims=True)
    expected = result.logit_shift - result.logit_shift.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(centred, expected, rtol=0, atol=1e-6)


def test_all_classes_scheme_shrinks_the_step_on_near_ties_instead_of_flipping() -> None:
    inputs = _random_inputs(np.random.default_rng(9), 2_000)
    probabilities = np.tile([0.5 + 1e-4, 0.5 - 1e-4], (2_000, 1))
    result = HmacAllClassesScheme(alpha=0.3).apply(probabilities, inputs, KEY)
    np.testing.assert_array_equal(np.argmax(result.probabilities, axis=1), 0)
    signs = hmac_class_signs(inputs, 2, KEY)
    # Where the runner-up would gain on the top class the step is scaled down to keep it MARGIN below.
    gaining = signs[:, 1] > signs[:, 0]
    assert gaining.any()
    assert (~gaining).any()
    assert np.all(np.abs(result.logit_shift[gaining]) < 0.3)
    np.testing.assert_allclose(np.abs(result.logit_shift[~gaining]), 0.3, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Pinned outputs: these values come from the original row-major numpy code. The compiled kernels compute
# the same formulas with C-library exp and log and with softmax(log(p + eps) + shift) rewritten as
# (p + eps) * exp(shift) normalised, so a returned probability may move by a few ulps (below 8); the
# applied logit shift, the perturbation and the labels must not move at all.

PINNED_PROBABILITIES = np.array([[0.5, 0.3, 0.15, 0.05], [0.26, 0.25, 0.25, 0.24], [0.01, 0.02, 0.9, 0.07]])
PINNED_ALL_CLASSES = [
    ["0x1.b4cef2563cbe2p-2", "0x1.86fc2436c1658p-2", "0x1.0615c567569efp-3", "0x1.04a81afd5a336p-4"],
    ["0x1.079aa19371629p-2", "0x1.faee4a7765d1ap-3", "0x1.079a904ce745ap-2", "0x1.e6a751c7e8de4p-3"],
    ["0x1.b8c12379910f2p-8", "0x1.48c396dec2891p-6", "0x1.ce52fd592eeecp-1", "0x1.1fab1d473ed6fp-4"],
]
PINNED_SECOND_CLASS = [
    ["0x1.02d75a2d72b1ap-1", "0x1.2b3e9c046aba0p-2", "0x1.369c06c3533f4p-3", "0x1.9e2561f83219fp-5"],
    ["0x1.079aa19371629p-2", "0x1.079a904ce745ap-2", "0x1.faee4a7765d1ap-3", "0x1.e6a751c7e8de4p-3"],
    ["0x1.49daf7e790ea4p-7", "0x1.49daed188aaa1p-6", "0x1.cfdbce8dda66ap-1", "0x1.056f714e18030p-4"],
]


def _from_hex(rows: list[list[str]]) -> np.ndarray:
    return np.array([[float.fromhex(value) for value in row] for row in rows])


def test_hmac_schemes_reproduce_pinned_outputs() -> None:
    inputs = np.random.default_rng(77).normal(size=(3, 5))
    all_classes = HmacAllClassesScheme().apply(PINNED_PROBABILITIES, inputs, KEY)
    np.testing.assert_array_max_ulp(all_classes.probabilities, _from_hex(PINNED_ALL_CLASSES), maxulp=8)
    np.testing.assert_array_equal(all_classes.probabilities.argmax(axis=1), [0, 0, 2])
    np.testing.assert_array_equal(all_classes.perturbation, [0.4, 0.0, 0.0])
    np.testing.assert_array_equal(
        all_classes.logit_shift,
        [
            [-0.2, 0.2, -0.2, 0.2],
            [-0.019609855807409995, -0.019609855807409995, 0.019609855807409995, -0.019609855807409995],
            [-0.2, 0.2, 0.2, 0.2],
        ],
    )
    second_class = HmacSecondClassScheme().apply(PINNED_PROBABILITIES, inputs, KEY)
    np.testing.assert_array_max_ulp(second_class.probabilities, _from_hex(PINNED_SECOND_CLASS), maxulp=8)
    np.testing.assert_array_equal(second_class.probabilities.argmax(axis=1), [0, 0, 2])


# ---------------------------------------------------------------------------------------------------------
# FastAllClassesScheme: the all-classes step with signs from a vectorised keyed hash


def _fmix64_scalar(value: int) -> int:
    mask = (1 << 64) - 1
    value ^= value >> 33
    value = (value * 0xFF51AFD7ED558CCD) & mask
    value ^= value >> 33
    value = (value * 0xC4CEB9FE1A85EC53) & mask
    return value ^ (value >> 33)


def _fast_signs_reference(row: np.ndarray, n_classes: int, key: bytes) -> list[float]:
    """The module docstring's derivation for one row, in Python integers, independent of the module."""
    n_features = row.size
    n_pieces = 4 * n_features
    weight_bits = min(32, 37 - (n_pieces - 1).bit_length())
    prefix = b"modelprint.fast-all-classes.v1\x00" + struct.pack("<I", n_features)
    n_blocks = -(-(32 * n_features + 32) // 32)
    stream = b"".join(
        hmac.digest(key, prefix + struct.pack("<I", block), "sha256") for block in range(n_blocks)
    )
    words = struct.unpack_from(f"<{2 * n_pieces}I", stream)
    w0 = [word % 2**weight_bits for word in words[:n_pieces]]
    w1 = [word % 2**weight_bits for word in words[n_pieces:]]
    m0, m1, m2, k = struct.unpack_from("<4Q", stream, 8 * n_pieces)
    m0, m1, m2 = m0 | 1, m1 | 1, m2 | 1
    feature_bytes = struct.pack(f"<{n_features}d", *(value + 0.0 for value in row.tolist()))
    pieces = struct.unpack(f"<{n_pieces}H", feature_bytes)
    a = sum(w * s for w, s in zip(w0, pieces, strict=True))
    b = sum(w * s for w, s in zip(w1, pieces, strict=True))
    assert a < 2**53
    assert b < 2**53
    h = (a * m0 + b * m1) % 2**64
    return [1.0 if _fmix64_scalar((h + k + c * m2) % 2**64) >> 63 else -1.0 for c in range(n_classes)]


def _fast_signs(inputs: np.ndarray, n_classes: int, key: bytes = KEY) -> np.ndarray:
    """Row-major +1/-1 signs from the module's class-major booleans."""
    return np.where(fast_class_signs(inputs, n_classes, key), 1.0, -1.0)


@pytest.mark.parametrize("n_features", [1, 5, 80])
def test_fast_signs_follow_the_documented_derivation(n_features: int) -> None:
    rng = np.random.default_rng(n_features)
    inputs = rng.normal(size=(6, n_features)) * 10.0 ** rng.integers(-5, 5, size=(6, n_features))
    inputs[0] = 0.0
    inputs[1, 0] = -0.0
    signs = _fast_signs(inputs, 7)
    for row, expected_row in zip(inputs, signs, strict=True):
        np.testing.assert_array_equal(expected_row, _fast_signs_reference(row, 7, KEY))


def test_fast_signs_stay_exact_with_many_features_and_all_ones_pieces() -> None:
    # Every 16-bit piece at its maximum (NaN payload bits all set) makes the projection's partial sums
    # as large as they get; with 4,000 features the weights have 37 - 14 = 23 bits.
    all_ones = np.frombuffer(b"\xff" * 8 * 4_000, dtype="<f8").reshape(1, -1)
    rows = np.vstack([all_ones, np.random.default_rng(3).normal(size=(2, 4_000))])
    signs = _fast_signs(rows, 3)
    for row, signs_row in zip(rows, signs, strict=True):
        np.testing.assert_array_equal(signs_row, _fast_signs_reference(row, 3, KEY))


def test_fast_signs_are_deterministic_and_key_dependent() -> None:
    inputs = _random_inputs(np.random.default_rng(11), 4_000)
    first = _fast_signs(inputs, 4)
    np.testing.assert_array_equal(first, _fast_signs(inputs.copy(), 4))
    np.testing.assert_array_equal(first, _fast_signs(np.asfortranarray(inputs), 4))
    np.testing.assert_array_equal(first, _fast_signs(inputs.astype(">f8"), 4))
    # Another key agrees on about half of the signs (16,000 signs: 4 standard errors is 1.6 points).
    agreement = np.mean(first == _fast_signs(inputs, 4, OTHER_KEY))
    assert abs(agreement - 0.5) < 4 * 0.5 / np.sqrt(first.size)
    with pytest.raises(ValueError, match="empty"):
        fast_class_signs(inputs, 4, b"")


def test_fast_signs_are_balanced_and_independent_across_classes_and_nearby_rows() -> None:
    rng = np.random.default_rng(12)
    inputs = _random_inputs(rng, 20_000)
    signs = _fast_signs(inputs, 4)
    assert np.all(np.abs((signs > 0).mean(axis=0) - 0.5) < 4 * 0.5 / np.sqrt(20_000))
    correlation = np.corrcoef(signs.T)[np.triu_indices(4, 1)]
    assert np.all(np.abs(correlation) < 4 / np.sqrt(20_000))
    # Not a smooth function of the input: moving every feature by 1e-9 (or one feature by one ulp)
    # gives unrelated signs.
    for nudged in (inputs + 1e-9, np.column_stack([np.nextafter(inputs[:, 0], np.inf), inputs[:, 1:]])):
        agreement = np.mean(signs == _fast_signs(nudged, 4))
        assert abs(agreement - 0.5) < 4 * 0.5 / np.sqrt(signs.size)


def test_fast_signs_ignore_float_width_negative_zero_and_batch() -> None:
    rng = np.random.default_rng(13)
    inputs32 = rng.normal(size=(500, 80)).astype(np.float32)
    inputs32[:, :10] = 0.0
    widened = inputs32.astype(np.float64)
    signs = _fast_signs(widened, 4)
    np.testing.assert_array_equal(_fast_signs(inputs32, 4), signs)
    negative_zeros = widened.copy()
    negative_zeros[:, :10] = -0.0
    np.testing.assert_array_equal(_fast_signs(negative_zeros, 4), signs)
    # A row's signs do not depend on the batch around it (the projection is exact for any BLAS path).
    for row in (0, 17, 499):
        np.testing.assert_array_equal(_fast_signs(widened[row : row + 1], 4)[0], signs[row])
    big = np.vstack([widened, rng.normal(size=(7_500, 80))])
    np.testing.assert_array_equal(_fast_signs(big, 4)[:500], signs)
    np.testing.assert_array_equal(_fast_signs(widened, 2), signs[:, :2])


def test_fast_scheme_is_the_all_classes_step_with_its_own_signs() -> None:
    rng = np.random.default_rng(14)
    inputs = _random_inputs(rng, 3_000)
    probabilities = rng.dirichlet(np.full(5, 0.3), size=3_000)
    result = FastAllClassesScheme(alpha=0.3).apply(probabilities, inputs, KEY)
    # Same arithmetic as HmacAllClassesScheme given the same signs.
    signs = _fast_signs(inputs, 5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("shared.fingerprint._hmac_positive_signs", lambda *_: signs > 0.0)
        expected = HmacAllClassesScheme(alpha=0.3).apply(probabilities, inputs, KEY)
    np.testing.assert_array_equal(result.probabilities, expected.probabilities)
    np.testing.assert_array_equal(result.logit_shift, expected.logit_shift)
    np.testing.assert_array_equal(result.perturbation, expected.perturbation)


def test_fast_scheme_logit_shift_is_what_moved_the_returned_logits() -> None:
    rng = np.random.default_rng(15)
    inputs = _random_inputs(rng, 500)
    probabilities = _softmax(np.column_stack([np.full(500, 6.0), rng.uniform(-2, 0, size=(500, 3))]))
    result = FastAllClassesScheme(alpha=0.2).apply(probabilities, inputs, KEY)
    np.testing.assert_allclose(result.logit_shift, 0.2 * _fast_signs(inputs, 4), rtol=0, atol=1e-12)
    moved = np.log(result.probabilities) - np.log(probabilities + EPSILON)
    centred = moved - moved.mean(axis=1, keepdims=True)
    expected = result.logit_shift - result.logit_shift.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(centred, expected, rtol=0, atol=1e-6)
    # Recomputing from clean probabilities gives the same shift (what the scans' watermark replay does).
    again = FastAllClassesScheme(alpha=0.2).apply(probabilities.copy(), inputs.copy(), KEY)
    np.testing.assert_array_equal(again.logit_shift, result.logit_shift)


def test_fast_scheme_mark_is_detected_in_a_distilled_surrogate_and_not_in_an_independent_model() -> None:
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(16)
    weights = rng.normal(size=(N_FEATURES, 4))
    queries = _random_inputs(rng, 1_500)
    clean = _softmax(queries @ weights)
    scheme = FastAllClassesScheme()
    answers = scheme.apply(clean, queries, KEY).probabilities

    def watermark_z(trained_on: np.ndarray) -> float:
        surrogate = MLPRegressor(hidden_layer_sizes=(256,), max_iter=400, random_state=0)
        surrogate.fit(queries, np.log(trained_on + EPSILON))
        predicted = _softmax(surrogate.predict(queries))
        suspect = SuspectAnswers(np.argmax(predicted, axis=1), predicted)
        outcome = _watermark_replay_test(
            "watermark_replay", queries, suspect, clean, scheme, KEY, 100, np.random.default_rng(0)
        )
        return float(outcome.details["z"])

    assert watermark_z(answers) > 4.0
    assert abs(watermark_z(clean)) < 3.0


# ---------------------------------------------------------------------------------------------------------
# The compiled kernels against the documented formulas, written out in numpy; and the HMAC shortcut


def _documented_all_classes(probabilities: np.ndarray, signs: np.ndarray, alpha: float) -> np.ndarray:
    """softmax(log(p + eps) + lambda * alpha * signs), lambda the largest value in [0, 1] that keeps the
    top class MARGIN above every class that gains on it (module docstring), row by row."""
    logits = np.log(probabilities + EPSILON)
    top, _ = _top_and_second(probabilities)
    rows = np.arange(len(probabilities))
    gains = (signs > 0) & (signs[rows, top] < 0)[:, None]
    highest_gaining = np.where(gains, logits, -np.inf).max(axis=1)
    scale = np.clip((logits[rows, top] - highest_gaining - MARGIN) / (2 * alpha), 0.0, 1.0)
    return _softmax(logits + scale[:, None] * alpha * signs)


def _documented_second_class(probabilities: np.ndarray, base: np.ndarray, alpha: float) -> np.ndarray:
    logits = np.log(probabilities + EPSILON)
    top, second = _top_and_second(probabilities)
    rows = np.arange(len(probabilities))
    logits[rows, second] += np.minimum(alpha * base, logits[rows, top] - logits[rows, second] - MARGIN)
    return _softmax(logits)


def _probabilities_with_near_ties(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    probabilities = rng.dirichlet(np.full(n_classes, 0.4), size=n_rows)
    # A quarter of the rows: the top two classes within 1e-7 .. 1e-3 of each other.
    near = rng.random(n_rows) < 0.25
    order = np.argsort(-probabilities, axis=1)
    rows = np.flatnonzero(near)
    gap = 10.0 ** rng.uniform(-7, -3, size=rows.size)
    probabilities[rows, order[rows, 1]] = probabilities[rows, order[rows, 0]] * (1 - gap)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 4, 11])
def test_compiled_steps_match_the_documented_formulas(n_classes: int) -> None:
    rng = np.random.default_rng(100 + n_classes)
    inputs = _random_inputs(rng, 20_000)
    probabilities = _probabilities_with_near_ties(rng, 20_000, n_classes)
    labels = probabilities.argmax(axis=1)
    cases = [
        (
            HmacAllClassesScheme(alpha=0.2),
            _documented_all_classes(probabilities, hmac_class_signs(inputs, n_classes, KEY), 0.2),
        ),
        (
            FastAllClassesScheme(alpha=0.2),
            _documented_all_classes(probabilities, _fast_signs(inputs, n_classes), 0.2),
        ),
        (
            HmacSecondClassScheme(alpha=0.08),
            _documented_second_class(probabilities, hmac_base(inputs, KEY), 0.08),
        ),
    ]
    for scheme, expected in cases:
        result = scheme.apply(probabilities, inputs, KEY)
        np.testing.assert_array_equal(result.probabilities.argmax(axis=1), labels)
        np.testing.assert_allclose(result.probabilities, expected, rtol=1e-12, atol=1e-300)
        # The logit shift is what moved the returned logits (up to the softmax's common constant).
        moved = np.log(result.probabilities) - np.log(probabilities + EPSILON)
        centred = (moved - result.logit_shift) - (moved - result.logit_shift).mean(axis=1, keepdims=True)
        assert np.abs(centred).max() < 1e-9


def test_schemes_answer_an_empty_batch() -> None:
    for name in SCHEMES:
        result = get_scheme(name).apply(np.zeros((0, 3)), np.zeros((0, 5)), KEY)
        assert result.probabilities.shape == (0, 3)
        assert result.logit_shift.shape == (0, 3)
        assert result.perturbation.shape == (0,)


@pytest.mark.parametrize("key_length", [1, 32, 64, 65, 200])
def test_row_digests_are_the_hmac_of_each_message_and_suffix(key_length: int) -> None:
    # Keys up to the SHA-256 block (64 bytes) are padded, longer ones hashed first (RFC 2104).
    key = bytes((7 * index + 3) % 256 for index in range(key_length))
    rng = np.random.default_rng(key_length)
    inputs = rng.normal(size=(9, 6))
    inputs[0, 0] = -0.0
    suffixes = (b"", (1).to_bytes(4, "little"), (2).to_bytes(4, "little"))
    expected = b"".join(
        hmac.digest(key, message + suffix, "sha256")
        for message in canonical_messages(inputs)
        for suffix in suffixes
    )
    assert row_digests(inputs, key, suffixes) == expected
    assert row_digests(np.asfortranarray(inputs), key, suffixes) == expected
    assert row_digests(inputs[:0], key) == b""
    with pytest.raises(ValueError, match="empty"):
        row_digests(inputs, b"")
