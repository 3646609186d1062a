"""Extraction-suspicion detectors against honest ECG clients and three extraction strategies.

The acceptance experiment in miniature, with the functions the auditor runs: 10 honest clients x 2,000
natural queries raise no alarm; uniform random queries, Jacobian augmentation (JBDA) and perturbation
pairs are flagged within 500 queries. Queries are fed in chunks of 50, as the auditor's jobs would.
Run with ``-s`` to see the measured scores and detection query counts.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from modelprint.attacks import (
    JacobianAugmentation,
    ecg_sampler,
    jacobian_augmentation_queries,
    natural_queries,
    perturbation_pair_queries,
    uniform_random_queries,
)
from modelprint.training import TrainedModel, train_ecg_model
from services.auditor.detectors import (
    REPEAT_TOLERANCE,
    Detector,
    DetectorResult,
    NearDuplicateDetector,
    OutOfDistributionDetector,
    PradaDetector,
    ReferenceProfile,
    default_detectors,
)
from shared.ecg import generate_ecg

CHUNK = 50
HONEST_CLIENTS = 10
HONEST_QUERIES = 2000
ATTACK_BUDGET = 500
DETECTOR_NAMES = ("prada", "out_of_distribution", "near_duplicates")


@dataclass(frozen=True)
class Setup:
    model: TrainedModel
    profile: ReferenceProfile

    def labels(self, X: np.ndarray) -> np.ndarray:
        """Predicted class indices, as the auditor stores them (argmax of predict_proba)."""
        return np.asarray(np.argmax(self.model.estimator.predict_proba(X), axis=1), dtype=np.int64)


@dataclass
class Run:
    """Every result of every detector over one client's stream."""

    results: dict[str, list[DetectorResult]]
    states: dict[str, bytes]

    def first_alarm(self, name: str) -> int | None:
        """Queries seen when the detector first reported an alarm (end of that chunk)."""
        return next((r.queries_seen for r in self.results[name] if r.alarm), None)

    def first_any_alarm(self) -> int | None:
        counts = [c for c in (self.first_alarm(name) for name in self.results) if c is not None]
        return min(counts, default=None)


@pytest.fixture(scope="module")
def setup() -> Setup:
    model = train_ecg_model()
    # The reference data of a deployed version: the model's held-out test split.
    return Setup(model, ReferenceProfile.from_reference(model.X_test))


def feed(setup: Setup, X: np.ndarray, chunk: int = CHUNK, detectors: list[Detector] | None = None) -> Run:
    detectors = default_detectors(setup.profile) if detectors is None else detectors
    labels = setup.labels(X)
    states: dict[str, bytes | None] = {d.name: None for d in detectors}
    results: dict[str, list[DetectorResult]] = {d.name: [] for d in detectors}
    for start in range(0, X.shape[0], chunk):
        for detector in detectors:
            state, result = detector.update(
                states[detector.name], X[start : start + chunk], labels[start : start + chunk]
            )
            states[detector.name] = state
            results[detector.name].append(result)
    return Run(results, {name: state for name, state in states.items() if state is not None})


def honest_queries(seed: int, n: int = HONEST_QUERIES) -> np.ndarray:
    return natural_queries(lambda k: generate_ecg(k, seed=seed)[0], n)


def attack_queries(setup: Setup, attack: str, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    reference = setup.model.X_test
    std = reference.std(axis=0)
    if attack == "uniform_random":
        return uniform_random_queries(reference, ATTACK_BUDGET, rng)
    if attack == "jacobian_augmentation":
        seeds = generate_ecg(10, seed=4000 + seed)[0]
        return jacobian_augmentation_queries(
            seeds, setup.model.estimator.predict, ATTACK_BUDGET, rng, step=0.1, feature_scale=std
        )
    if attack == "perturbation_pairs":
        natural = generate_ecg(ATTACK_BUDGET, seed=3000 + seed)[0]
        return perturbation_pair_queries(natural, ATTACK_BUDGET, rng, scale=0.05, feature_std=std)
    raise AssertionError(attack)


# --- the acceptance experiment ------------------------------------------------------------------------


def test_honest_clients_raise_no_alarm(setup: Setup) -> None:
    worst: dict[str, tuple[float, float, int]] = {}
    alarms = []
    for i in range(HONEST_CLIENTS):
        seed = 1000 + i
        run = feed(setup, honest_queries(seed))
        for name, results in run.results.items():
            alarms += [(seed, r.queries_seen, r.explanation) for r in results if r.alarm]
            # Scores before a test can run (fewer than 50 queries / 100 distances) mean nothing.
            tested = [r for r in results if r.queries_seen >= 200]
            peak = max(tested, key=lambda r: r.score / r.threshold)
            if name not in worst or peak.score / peak.threshold > worst[name][0] / worst[name][1]:
                worst[name] = (peak.score, peak.threshold, seed)
        prada_min_w = run.results["prada"][-1].details["min_shapiro_w"]
        assert prada_min_w > PradaDetector(setup.profile).delta
    print(f"\nhonest clients: {HONEST_CLIENTS} x {HONEST_QUERIES} queries, chunks of {CHUNK}")
    for name, (score, threshold, seed) in worst.items():
        print(f"  {name:20s} max score {score:.4f} vs threshold {threshold:.4f} (client seed {seed})")
    assert not alarms, alarms[:3]


@pytest.mark.parametrize(
    ("attack", "expected_detector"),
    [
        ("uniform_random", "out_of_distribution"),
        ("jacobian_augmentation", "near_duplicates"),
        ("perturbation_pairs", "near_duplicates"),
    ],
)
def test_attacks_are_flagged_within_500_queries(setup: Setup, attack: str, expected_detector: str) -> None:
    X = attack_queries(setup, attack)
    assert X.shape == (ATTACK_BUDGET, setup.profile.n_features)
    run = feed(setup, X)
    per_detector = {name: run.first_alarm(name) for name in DETECTOR_NAMES}
    exact = {
        name: run.results[name][-1].details.get("first_alarm_query")
        for name in DETECTOR_NAMES
        if "first_alarm_query" in run.results[name][-1].details
    }
    print(
        f"\n{attack}: first flagged after {run.first_any_alarm()} queries (chunks of {CHUNK}); "
        f"per detector {per_detector}; exact first failing query {exact}"
    )
    first = run.first_any_alarm()
    assert first is not None, per_detector
    assert first <= ATTACK_BUDGET, per_detector
    caught_at = per_detector[expected_detector]
    assert caught_at is not None
    assert caught_at <= ATTACK_BUDGET


def test_prada_catches_perturbation_pairs_and_jbda_but_misses_uniform(setup: Setup) -> None:
    """PRADA's known blind spot (in high dimension random distances concentrate) is covered by OOD."""
    firsts = {
        attack: feed(setup, attack_queries(setup, attack)).first_alarm("prada")
        for attack in ("uniform_random", "jacobian_augmentation", "perturbation_pairs")
    }
    print(f"\nprada first alarm: {firsts}")
    assert firsts["uniform_random"] is None
    assert firsts["jacobian_augmentation"] is not None
    assert firsts["jacobian_augmentation"] <= ATTACK_BUDGET
    assert firsts["perturbation_pairs"] is not None
    assert firsts["perturbation_pairs"] <= ATTACK_BUDGET


def test_attack_after_honest_history_is_flagged_quickly(setup: Setup) -> None:
    """A client that behaves for 1,000 queries and then starts perturbation probing is not diluted."""
    honest = honest_queries(2000, 1000)
    X = np.concatenate([honest, attack_queries(setup, "perturbation_pairs", seed=11)])
    run = feed(setup, X)
    first = run.first_any_alarm()
    print(f"\nperturbation pairs after 1,000 honest queries: flagged at query {first}")
    assert first is not None
    assert 1000 < first <= 1000 + 100


def test_a_burst_inside_one_large_update_still_alarms(setup: Setup) -> None:
    """A catch-up job of 1,500 rows, 300 of them uniform random in the middle, ending with honest ones."""
    rng = np.random.default_rng(3)
    X = np.concatenate(
        [
            honest_queries(2001, 600),
            uniform_random_queries(setup.model.X_test, 300, rng),
            honest_queries(2002, 600),
        ]
    )
    detector = OutOfDistributionDetector(setup.profile)
    _, result = detector.update(None, X, setup.labels(X))
    assert result.score < result.threshold  # the last 200 queries are honest...
    assert result.alarm  # ...but the update saw the burst
    assert 600 < result.details["alarm_window_end_query"] <= 900
    assert "ALARM earlier in this update" in result.explanation


def test_retries_are_not_near_duplicates(setup: Setup) -> None:
    """An honest client that sends every query twice (retries) is answered identically: no evidence."""
    X = np.repeat(honest_queries(2003, 500), 2, axis=0)
    run = feed(setup, X)
    assert run.first_any_alarm() is None
    assert run.results["near_duplicates"][-1].details["repeats"] == 500


# --- incremental operation and state ------------------------------------------------------------------


def _assert_same_result(a: DetectorResult, b: DetectorResult) -> None:
    assert (a.detector, a.alarm, a.queries_seen) == (b.detector, b.alarm, b.queries_seen)
    assert a.score == pytest.approx(b.score, rel=1e-9, abs=1e-12)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-12)
    assert a.details.keys() == b.details.keys()
    for key in a.details:
        assert a.details[key] == pytest.approx(b.details[key], rel=1e-9, abs=1e-12), key


def _load(state: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(state), allow_pickle=False) as archive:
        return {key: np.array(archive[key]) for key in archive.files}


@pytest.mark.parametrize("stream", ["honest", "perturbation_pairs"])
def test_incremental_equals_batch(setup: Setup, stream: str) -> None:
    if stream == "honest":
        X = honest_queries(1500)
    else:
        natural = generate_ecg(1000, seed=3500)[0]
        X = perturbation_pair_queries(
            natural, 2000, np.random.default_rng(5), feature_std=setup.model.X_test.std(0)
        )
    labels = setup.labels(X)
    chunked = feed(setup, X, chunk=137)  # deliberately not a divisor of anything
    for detector in default_detectors(setup.profile):
        state, result = detector.update(None, X, labels)
        _assert_same_result(result, chunked.results[detector.name][-1])
        whole, parts = _load(state), _load(chunked.states[detector.name])
        assert whole.keys() == parts.keys()
        for key in whole:
            if key == "meta":
                assert json.loads(str(whole[key])) == json.loads(str(parts[key]))
            else:
                np.testing.assert_allclose(whole[key], parts[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_state_round_trips_without_pickle_and_stays_bounded(setup: Setup) -> None:
    X = natural_queries(ecg_sampler(np.random.default_rng(99)), 20_000)
    labels = setup.labels(X)
    detectors = default_detectors(setup.profile)
    states: dict[str, bytes | None] = {d.name: None for d in detectors}
    sizes: dict[str, list[int]] = {d.name: [] for d in detectors}
    for start in range(0, X.shape[0], 1000):
        for detector in detectors:
            state, result = detector.update(
                states[detector.name], X[start : start + 1000], labels[start : start + 1000]
            )
            states[detector.name] = state
            sizes[detector.name].append(len(state))
            assert not result.alarm, result.explanation
    F = setup.profile.n_features
    bounds = {
        "prada": 4 * (1000 * F * 4) + 5000 * 8 + 64_000,  # 4 classes x 1,000 members, 5,000 distances
        "out_of_distribution": 64_000,
        "near_duplicates": 5000 * F * 4 + 64_000,
    }
    print(f"\nstate sizes after 20,000 queries: { {name: s[-1] for name, s in sizes.items()} } bytes")
    for detector in detectors:
        stored = states[detector.name]
        assert stored is not None
        arrays = _load(stored)  # allow_pickle=False: would raise on any object array
        assert all(a.dtype != object for a in arrays.values())
        meta = json.loads(str(arrays["meta"]))
        assert meta["detector"] == detector.name
        assert meta["seen"] == 20_000
        assert max(sizes[detector.name]) <= bounds[detector.name]
        if detector.name != "prada":  # prada's growing sets fill up more slowly, to their own cap
            assert sizes[detector.name][-1] <= sizes[detector.name][4] * 1.01  # flat from 5,000 queries on
        # Round trip: continuing from the stored bytes works and counts on.
        _, result = detector.update(stored, X[:10], labels[:10])
        assert result.queries_seen == 20_010


def test_state_of_another_profile_or_garbage_starts_over(setup: Setup) -> None:
    X = honest_queries(2004, 300)
    labels = setup.labels(X)
    other = ReferenceProfile.from_reference(setup.model.X_train)
    for make in (PradaDetector, OutOfDistributionDetector, NearDuplicateDetector):
        state, _ = make(other).update(None, X, labels)
        for stale in (state, b"not an npz archive"):
            _, result = make(setup.profile).update(stale, X[:60], labels[:60])
            assert result.queries_seen == 60
            assert result.details["state_reset"] == 1.0


def test_updates_are_fast(setup: Setup) -> None:
    X = honest_queries(2005)
    labels = setup.labels(X)
    for detector in default_detectors(setup.profile):
        started = time.perf_counter()
        state, _ = detector.update(None, X, labels)
        first = time.perf_counter() - started
        started = time.perf_counter()
        detector.update(state, X[:100], labels[:100])
        more = time.perf_counter() - started
        print(
            f"\n{detector.name}: 2,000 x 80 in {first * 1000:.0f} ms, then 100 more in {more * 1000:.0f} ms"
        )
        assert first < 1.0
        assert more < 0.5


def test_inputs_are_checked(setup: Setup) -> None:
    detector = OutOfDistributionDetector(setup.profile)
    with pytest.raises(ValueError, match="shape"):
        detector.update(None, np.zeros((3, 7)), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        detector.update(None, np.full((2, 80), np.nan), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="labels"):
        detector.update(None, np.zeros((2, 80)), np.array(["a", "b"]))
    state, result = detector.update(None, np.empty((0, 80)), np.empty(0, dtype=np.int64))
    assert result.queries_seen == 0
    assert not result.alarm


# --- explanations -------------------------------------------------------------------------------------


def _check_explanation(result: DetectorResult) -> None:
    text = result.explanation
    assert text, result
    assert text[0].isupper() or text[0].isdigit(), text
    assert text.endswith("."), text
    assert json.loads(json.dumps(result.details, allow_nan=False)) == result.details
    if result.detector == "prada":
        if "shapiro_w" in result.details:
            assert f"W = {result.details['shapiro_w']:.3f}" in text
            assert f"score 1 - W = {result.score:.3f}" in text
            assert f"threshold {result.threshold:.2f}" in text
    else:
        flagged, window = int(result.details["flagged"]), int(result.details["window"])
        assert (
            f"{flagged} of the last {window} queries ({result.score:.1%})" in text or result.queries_seen < 50
        )
        assert f"{result.details['distance_threshold']:.2f}" in text
        if result.queries_seen >= 50:
            assert f"({result.threshold:.1%})" in text
    if result.alarm:
        assert "ALARM" in text


def test_explanations_are_sentences_with_the_numbers(setup: Setup) -> None:
    honest = feed(setup, honest_queries(2006, 400))
    attacked = feed(setup, attack_queries(setup, "perturbation_pairs"))
    for run in (honest, attacked):
        for results in run.results.values():
            for result in results:
                _check_explanation(result)
    example = attacked.results["near_duplicates"][-1]
    print(f"\nexample: {example.explanation}")
    assert example.alarm
    assert example.score >= example.threshold


# --- attack generators ------------------------------------------------------------------------------


def test_attack_generators(setup: Setup) -> None:
    reference = setup.model.X_test
    std = reference.std(axis=0)
    rng = np.random.default_rng(0)
    uniform = uniform_random_queries(reference, 100, rng)
    assert np.all(uniform >= reference.min(axis=0))
    assert np.all(uniform <= reference.max(axis=0))
    natural = generate_ecg(40, seed=3600)[0]
    pairs = perturbation_pair_queries(natural, 90, rng, scale=0.05, copies=2, feature_std=std)
    assert pairs.shape == (90, 80)
    np.testing.assert_array_equal(pairs[::3], natural[:30])
    assert np.all(np.abs((pairs[1::3] - natural[:30]) / std).mean(axis=1) < 0.1)
    with pytest.raises(ValueError, match="natural rows"):
        perturbation_pair_queries(natural, 200, rng)
    # JBDA: every row after the seeds is a previous row moved by exactly step * scale on each feature.
    calls: list[int] = []

    def oracle(rows: np.ndarray) -> np.ndarray:
        calls.append(rows.shape[0])
        return np.asarray(setup.model.estimator.predict(rows))

    seeds = generate_ecg(10, seed=4100)[0]
    attack = JacobianAugmentation(seeds, oracle, np.random.default_rng(1), step=0.1, feature_scale=std)
    rows, labels = attack.run(100)
    assert rows.shape == (100, 80)
    assert labels.shape == (100,)
    assert sum(calls) == 100
    assert calls == [10, 10, 20, 40, 20]  # the set doubles each round; the last is cut to the budget
    steps = (rows[10:, None, :] - rows[None, :, :]) / (0.1 * std)
    assert all(np.any(np.all(np.isclose(np.abs(steps[i, : 10 + i]), 1.0), axis=1)) for i in range(90))
    again = jacobian_augmentation_queries(
        seeds, oracle, 100, np.random.default_rng(1), step=0.1, feature_scale=std
    )
    np.testing.assert_array_equal(rows, again)
    sampler: Callable[[int], np.ndarray] = ecg_sampler(np.random.default_rng(2))
    a, b = natural_queries(sampler, 20), natural_queries(sampler, 20)
    assert a.shape == (20, 80)
    assert not np.allclose(a, b)
    assert REPEAT_TOLERANCE < 0.05 * np.sqrt(80) / 100
