"""Extraction-suspicion detectors: numpy logic (one numba kernel) the auditor runs incrementally per client.

Each detector sees one client's queries to one model version, a chunk at a time, in arrival order::

    state, result = detector.update(state, inputs, labels)

``inputs`` are the new query rows (n, F) float64, ``labels`` the predicted class indices (n,), ``state``
the bytes the previous call returned (None at first). The state is an ``np.savez`` archive of plain
arrays plus one JSON string (``meta``): it loads with ``np.load(..., allow_pickle=False)`` and never
holds a Python object. Its size is bounded whatever the number of queries (at 80 features: ~1.3 MB for
``prada``, ~1.6 MB for ``near_duplicates``, ~4 kB for ``out_of_distribution``; see each detector).
A state written for another reference profile (model version) or with other parameters, or one that
cannot be read, is discarded and the detector starts over on that client (``details["state_reset"]``).

All distances are Euclidean in the *standardised* space of the model's reference data (each feature
minus the reference mean, divided by the reference standard deviation), so that every feature counts
alike. Queries are rounded to float32 once standardised, which is also how histories are stored.

Feeding the same queries in one call or in chunks gives the same state and the same final result (up to
float rounding in matrix products): every decision is taken per query in arrival order, large calls are
processed in blocks of :data:`BLOCK_ROWS` rows, and tests are evaluated at fixed query counts, not at
chunk boundaries. The ``alarm`` of a result covers *every* query of that call: it is set when the test
fails at the end of the call or failed at any query count inside it (so that a burst of attack queries
inside a large catch-up batch is not missed); ``details`` and the explanation then say where.

Every detector alarms when ``score >= threshold`` (at the end of the call). The detectors and the
attacks they target (measured in ``tests/unit/test_detectors.py`` on the ECG model):

- ``prada`` (Juuti et al. 2019): the distances between a client's queries and its earlier queries of
  the same class are near-(log-)normal for natural data; perturbation pairs and JBDA steps break that.
- ``out_of_distribution``: queries far from every reference sample (uniform random, synthetic inputs).
- ``near_duplicates`` (in the spirit of SEAT, Zhang et al. 2021): queries closer to one of the client's
  own earlier queries than natural samples ever are to each other (perturbation pairs, JBDA steps).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import stats

try:  # scipy's Shapiro-Wilk routine itself, without the array-API and NaN-policy wrapper around it
    from scipy.stats._ansari_swilk_statistics import swilk as _swilk
except ImportError:  # pragma: no cover - another scipy layout: the public function, slower
    _swilk = None

from services.auditor import detector_kernels

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_ROWS",
    "REPEAT_TOLERANCE",
    "Detector",
    "DetectorResult",
    "NearDuplicateDetector",
    "OutOfDistributionDetector",
    "PradaDetector",
    "ReferenceProfile",
    "default_detectors",
    "pairwise_distances",
    "squared_distances",
]

STATE_FORMAT = "modelprint.detector-state"
STATE_VERSION = 1
# Large calls (a client's catch-up backlog) are processed in blocks of this many rows, so memory stays
# at a few (BLOCK_ROWS x history) distance matrices whatever the call size.
BLOCK_ROWS = 512
# Two rows closer than this (standardised L2) are the same query sent again (a retry). The API answers a
# repeat identically, so it teaches an attacker nothing: repeats are counted but never flagged. The value
# is far above float32 storage and matrix-product rounding (~1e-6) and far below any real perturbation
# (noise of 0.001 standard deviations on 80 features is already ~0.009 away).
REPEAT_TOLERANCE = 1e-4
# The same test on squared distances (the boundary may move by one ulp, which decides nothing).
REPEAT_TOLERANCE_SQUARED = REPEAT_TOLERANCE**2
# At least this many distinct reference rows are needed for the quantiles the detectors use.
MIN_REFERENCE_ROWS = 20


# -- distances -----------------------------------------------------------------------------------------


def shapiro_statistic(x: np.ndarray) -> float:
    """Shapiro-Wilk's W of a finite 1-D sample of at least 3 values: `scipy.stats.shapiro(x).statistic`.

    PRADA runs the test every 50 queries on up to 5,000 distances; the wrapper around scipy's routine
    (input checks for other array libraries, NaN policy, signature inspection) cost about 170 µs a
    call, more than the test's own sort and computation. This calls the routine as `stats.shapiro`
    does, with the same preparation, so W is equal bit for bit (tested, which also fails should a
    scipy release move the routine).
    """
    if _swilk is None:  # pragma: no cover
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(stats.shapiro(x).statistic)
    x = np.ravel(x).astype(np.float64)
    y = np.sort(x)
    y -= x[x.size // 2]  # as scipy does: a value near the median, for accuracy
    w, _, _ = _swilk(y, np.zeros(x.size // 2), 0)
    return float(w)


def squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(A), len(B)) with one matrix product: ||a||^2 + ||b||^2 - 2 a.b.

    The detectors need nearest neighbours, and sqrt is monotone, so they take minima of these and the
    square root of the minima only: sqrt(min(x)) == min(sqrt(x)) exactly, and the square root of a whole
    (rows x history) matrix was most of their cost.
    """
    sq = np.einsum("ij,ij->i", A, A)[:, None] + np.einsum("ij,ij->i", B, B)[None, :] - 2.0 * (A @ B.T)
    out: np.ndarray = np.maximum(sq, 0.0, out=sq)
    return out


def pairwise_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(A), len(B)): the square root of `squared_distances`."""
    out: np.ndarray = np.sqrt(squared_distances(A, B))
    return out


def _nearest(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Distance from each row of A to its nearest row of B (B non-empty), in blocks of A."""
    out = np.empty(A.shape[0], dtype=np.float64)
    for start in range(0, A.shape[0], BLOCK_ROWS):
        out[start : start + BLOCK_ROWS] = squared_distances(A[start : start + BLOCK_ROWS], B).min(axis=1)
    result: np.ndarray = np.sqrt(out, out=out)
    return result


def _round_rows(Z: np.ndarray) -> np.ndarray:
    out: np.ndarray = Z.astype(np.float32).astype(np.float64)
    return out


# -- reference profile ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ReferenceProfile:
    """What the detectors know about natural inputs, built once per deployed model version.

    ``mean``/``scale`` standardise features; ``reference`` is the reference set in standardised space;
    ``low``/``high`` the raw per-feature box; ``nn_distances`` the sorted leave-one-out nearest-neighbour
    distances inside the reference (each row to the nearest *other* row, exact duplicates skipped), i.e.
    how far natural samples lie from each other; ``profile_id`` a digest of the reference data.
    """

    mean: np.ndarray
    scale: np.ndarray
    reference: np.ndarray
    low: np.ndarray
    high: np.ndarray
    nn_distances: np.ndarray
    profile_id: str

    @classmethod
    def from_reference(cls, X_ref: np.ndarray) -> ReferenceProfile:
        X = np.asarray(X_ref, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < MIN_REFERENCE_ROWS or X.shape[1] < 1:
            raise ValueError(f"reference data must be (n >= {MIN_REFERENCE_ROWS}, F >= 1), got {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("reference data contains NaN or infinite values")
        mean = X.mean(axis=0)
        std = X.std(axis=0)
        # A constant feature carries no information: scale 1 keeps it from dividing by zero.
        scale = np.where(std > 0, std, 1.0)
        reference = _round_rows((X - mean) / scale)
        nn = np.empty(X.shape[0], dtype=np.float64)
        for start in range(0, X.shape[0], BLOCK_ROWS):
            block = pairwise_distances(reference[start : start + BLOCK_ROWS], reference)
            block[block <= REPEAT_TOLERANCE] = np.inf  # the row itself and exact duplicates
            nn[start : start + BLOCK_ROWS] = block.min(axis=1)
        nn = nn[np.isfinite(nn)]
        if nn.size < MIN_REFERENCE_ROWS:
            raise ValueError(f"reference data needs at least {MIN_REFERENCE_ROWS} distinct rows")
        digest = hashlib.sha256(np.asarray(X.shape, dtype="<i8").tobytes() + X.astype("<f8").tobytes())
        return cls(
            mean=mean,
            scale=scale,
            reference=reference,
            low=X.min(axis=0),
            high=X.max(axis=0),
            nn_distances=np.sort(nn),
            profile_id=digest.hexdigest()[:16],
        )

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def nn_quantile(self, q: float) -> float:
        """Quantile ``q`` (0..1) of the reference's leave-one-out nearest-neighbour distances."""
        return float(np.quantile(self.nn_distances, q))

    def standardise(self, X: np.ndarray) -> np.ndarray:
        """Rows in the reference's standardised space, rounded to float32 like stored histories."""
        return _round_rows((np.asarray(X, dtype=np.float64) - self.mean) / self.scale)


# -- results and the protocol ------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorResult:
    """A detector's verdict on one client after its latest update (alarm when score >= threshold, or
    when the test failed at some query count inside the update; see ``details``)."""

    detector: str
    score: float
    threshold: float
    alarm: bool
    explanation: str
    queries_seen: int
    details: dict[str, float] = field(default_factory=dict)


class Detector(Protocol):
    name: str

    def update(
        self, state: bytes | None, inputs: np.ndarray, labels: np.ndarray
    ) -> tuple[bytes, DetectorResult]: ...


# -- state archive ---------------------------------------------------------------------------------------


def _pack(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    payload: dict[str, Any] = {"meta": np.array(json.dumps(meta, sort_keys=True)), **arrays}
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    return buffer.getvalue()


def _unpack(state: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    with np.load(io.BytesIO(state), allow_pickle=False) as archive:
        for key in archive.files:
            arrays[key] = np.array(archive[key])
    meta = json.loads(str(arrays.pop("meta")))
    if not isinstance(meta, dict):
        raise ValueError("state meta is not a JSON object")
    return meta, arrays


def _fmt_p(p: float) -> str:
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


class _BaseDetector:
    """State handling, input checks and block processing shared by the detectors."""

    name: str = ""

    def __init__(self, profile: ReferenceProfile) -> None:
        self.profile = profile

    def config(self) -> dict[str, Any]:
        """Parameters that shape the state; a state written with other values is discarded."""
        raise NotImplementedError

    def _fresh(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        raise NotImplementedError

    def _step(
        self,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        Z: np.ndarray,
        labels: np.ndarray,
        call: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    def _result(
        self, meta: dict[str, Any], arrays: dict[str, np.ndarray], call: dict[str, Any]
    ) -> DetectorResult:
        raise NotImplementedError

    def update(
        self, state: bytes | None, inputs: np.ndarray, labels: np.ndarray
    ) -> tuple[bytes, DetectorResult]:
        """Add a client's new queries (arrival order) to the state; return the new state and the verdict."""
        X, y = self._check(inputs, labels)
        call: dict[str, Any] = {"alarm": False, "reset": False}
        meta, arrays = self._load(state, call)
        Z = self.profile.standardise(X)
        for start in range(0, Z.shape[0], BLOCK_ROWS):
            self._step(meta, arrays, Z[start : start + BLOCK_ROWS], y[start : start + BLOCK_ROWS], call)
        result = self._result(meta, arrays, call)
        if call["reset"]:
            result.details["state_reset"] = 1.0
        return _pack(meta, arrays), result

    def _check(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        F = self.profile.n_features
        X = np.asarray(inputs, dtype=np.float64)
        if X.size == 0:
            X = X.reshape(0, F)
        if X.ndim != 2 or X.shape[1] != F:
            raise ValueError(f"inputs must have shape (n, {F}), got {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("inputs contain NaN or infinite values")
        y = np.asarray(labels)
        if y.size == 0:
            y = y.reshape(0).astype(np.int64)
        if y.shape != (X.shape[0],) or y.dtype.kind not in "iu":
            raise ValueError(f"labels must be {X.shape[0]} integers, got shape {y.shape} dtype {y.dtype}")
        return X, y.astype(np.int64)

    def _load(
        self, state: bytes | None, call: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if state is None:
            return self._fresh()
        try:
            meta, arrays = _unpack(state)
        except (
            ValueError,
            OSError,
            KeyError,
            TypeError,
        ) as exc:  # what np.load / json raise on foreign bytes
            logger.warning("unreadable %s state discarded, starting over: %s", self.name, exc)
            call["reset"] = True
            return self._fresh()
        expected = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "detector": self.name,
            "profile": self.profile.profile_id,
            "config": self.config(),
        }
        if any(meta.get(key) != value for key, value in expected.items()):
            # Another model version (reference profile) or other parameters: distances and windows are not
            # comparable, so the detector starts over on this client.
            logger.info("%s state from another profile or configuration: starting over", self.name)
            call["reset"] = True
            return self._fresh()
        return meta, arrays

    def _meta(self, **counters: Any) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "detector": self.name,
            "profile": self.profile.profile_id,
            "config": self.config(),
            **counters,
        }


# -- windowed binomial tests -----------------------------------------------------------------------------


# Every scoring job builds its detectors afresh, and this table took about 10 ms to compute (200 binomial
# tails): 21 ms of CPU per job for the two window detectors, before the cache.
@functools.lru_cache(maxsize=64)
def _critical_counts(window: int, p0: float, alpha: float) -> np.ndarray:
    """For each window size w (0..window): the smallest count k with P(Binomial(w, p0) >= k) < alpha."""
    table = np.empty(window + 1, dtype=np.int64)
    for w in range(window + 1):
        ks = np.arange(w + 2)
        tail = stats.binom.sf(ks - 1, w, p0)  # P(X >= k)
        table[w] = int(ks[np.argmax(tail < alpha)]) if np.any(tail < alpha) else w + 1
    table.setflags(write=False)  # shared by every detector with these parameters
    return table


class _WindowBinomialDetector(_BaseDetector):
    """Flags single queries, then tests the share of flagged queries in the client's recent window.

    The flagged count in the last ``window`` queries (or all of them while fewer were seen) is compared
    with Binomial(w, p0): the test fails when P(X >= count) < ``alpha``, once ``min_queries`` queries were
    seen. ``score`` is the flagged share of the current window, ``threshold`` the smallest share that
    fails the test at that window size. The test is evaluated after every query (vectorised with a
    cumulative sum), so the verdict does not depend on how queries were chunked. State: the flags and
    per-query distances of the last ``window`` queries, plus counters.
    """

    def __init__(
        self,
        profile: ReferenceProfile,
        *,
        window: int = 200,
        min_queries: int = 50,
        p0: float = 0.03,
        alpha: float = 1e-6,
    ) -> None:
        super().__init__(profile)
        if not 1 <= min_queries <= window:
            raise ValueError(f"need 1 <= min_queries <= window, got {min_queries} and {window}")
        if not (0 < p0 < 1 and 0 < alpha < 1):
            raise ValueError(f"p0 and alpha must lie in (0, 1), got {p0} and {alpha}")
        self.window, self.min_queries, self.p0, self.alpha = window, min_queries, p0, alpha
        self._critical = _critical_counts(window, p0, alpha)

    def _window_config(self) -> dict[str, Any]:
        return {"window": self.window, "min_queries": self.min_queries, "p0": self.p0, "alpha": self.alpha}

    def _window_fresh(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = self._meta(seen=0, flagged_total=0, alarm_queries=0, first_alarm_query=None, max_share=0.0)
        arrays: dict[str, np.ndarray] = {
            "flags": np.zeros(0, dtype=np.uint8),
            "distances": np.zeros(0, dtype=np.float64),
        }
        return meta, arrays

    def _record(
        self,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        flags: np.ndarray,
        distances: np.ndarray,
        call: dict[str, Any],
    ) -> None:
        """Append per-query flags and evaluate the windowed test after each of the new queries."""
        previous = arrays["flags"].astype(np.int64)
        seen0 = int(meta["seen"])
        n = flags.shape[0]
        allf = np.concatenate([previous, flags.astype(np.int64)])
        prefix = np.concatenate([[0], np.cumsum(allf)])
        ends = previous.shape[0] + np.arange(1, n + 1)
        w = np.minimum(self.window, seen0 + np.arange(1, n + 1))
        counts = prefix[ends] - prefix[ends - w]
        tested = w >= self.min_queries
        alarms = tested & (counts >= self._critical[w])
        if np.any(tested):
            meta["max_share"] = max(float(meta["max_share"]), float(np.max(counts[tested] / w[tested])))
        if np.any(alarms):
            positions = np.flatnonzero(alarms)
            meta["alarm_queries"] = int(meta["alarm_queries"]) + int(positions.size)
            if meta["first_alarm_query"] is None:
                meta["first_alarm_query"] = seen0 + int(positions[0]) + 1
            pvalues = stats.binom.sf(counts[positions] - 1, w[positions], self.p0)
            worst = int(np.argmin(pvalues))
            if not call["alarm"] or float(pvalues[worst]) < call["worst_p"]:
                call.update(
                    alarm=True,
                    worst_p=float(pvalues[worst]),
                    worst_count=int(counts[positions[worst]]),
                    worst_window=int(w[positions[worst]]),
                    worst_query=seen0 + int(positions[worst]) + 1,
                )
        meta["seen"] = seen0 + n
        meta["flagged_total"] = int(meta["flagged_total"]) + int(flags.sum())
        arrays["flags"] = allf[-self.window :].astype(np.uint8)
        arrays["distances"] = np.concatenate([arrays["distances"], distances])[-self.window :]

    def _window_result(
        self,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        call: dict[str, Any],
        describe: Callable[[float], str],
        extra: dict[str, float],
    ) -> DetectorResult:
        """The verdict on the current window; ``describe(median distance)`` says what a flag means."""
        seen = int(meta["seen"])
        w = min(self.window, seen)
        count = int(arrays["flags"][-w:].sum()) if w else 0
        share = count / w if w else 0.0
        w_test = max(w, self.min_queries)
        critical = int(self._critical[w_test])
        threshold = critical / w_test
        p_value = float(stats.binom.sf(count - 1, w, self.p0)) if w else 1.0
        end_alarm = w >= self.min_queries and count >= critical
        recent = arrays["distances"][-w:] if w else arrays["distances"][:0]
        recent = recent[np.isfinite(recent)]
        median = float(np.median(recent)) if recent.size else 0.0
        details: dict[str, float] = {
            "window": float(w),
            "flagged": float(count),
            "share": share,
            "critical_count": float(critical),
            "expected_rate": self.p0,
            "alpha": self.alpha,
            "p_value": p_value,
            "median_distance_window": median,
            "flagged_total": float(meta["flagged_total"]),
            "max_share": float(meta["max_share"]),
            "alarm_queries": float(meta["alarm_queries"]),
            **extra,
        }
        if meta["first_alarm_query"] is not None:
            details["first_alarm_query"] = float(meta["first_alarm_query"])
        if seen < self.min_queries:
            sentence = (
                f"Only {seen} queries seen, the test starts at {self.min_queries}; {count} of them "
                f"({share:.1%}) {describe(median)}."
            )
        else:
            verdict = "ALARM: " if end_alarm else ""
            sentence = (
                f"{verdict}{count} of the last {w} queries ({share:.1%}) {describe(median)}; the alarm needs "
                f"{critical} ({threshold:.1%}) for an expected rate of at most {self.p0:.0%} "
                f"(binomial p = {_fmt_p(p_value)}, alarm below {self.alpha:.0e})."
            )
        if call["alarm"] and not end_alarm:
            details.update(
                alarm_window_end_query=float(call["worst_query"]),
                alarm_window_count=float(call["worst_count"]),
                alarm_window_size=float(call["worst_window"]),
                alarm_window_p_value=float(call["worst_p"]),
            )
            sentence += (
                f" ALARM earlier in this update: {call['worst_count']} of the {call['worst_window']} queries "
                f"up to query {call['worst_query']} were flagged (p = {_fmt_p(call['worst_p'])})."
            )
        return DetectorResult(
            detector=self.name,
            score=share,
            threshold=threshold,
            alarm=bool(end_alarm or call["alarm"]),
            explanation=sentence,
            queries_seen=seen,
            details=details,
        )


class OutOfDistributionDetector(_WindowBinomialDetector):
    """``out_of_distribution``: share of recent queries unlike any reference sample.

    A query is flagged when its distance to the nearest reference row exceeds the 99th percentile of the
    reference's own leave-one-out nearest-neighbour distances: it is farther from the data than 99 in
    100 natural samples are from their nearest neighbour. Natural queries are flagged about 1% of the
    time (ECG: 0.9-1.7% for each of 10 honest clients x 2,000 queries; a natural query has 300 reference
    rows to be near, a reference row 299, hence slightly under 1%), uniform random rows in the reference
    box essentially always. The window test (last 200 queries) uses p0 = 3% rather than 1%: the 99th
    percentile of a few hundred reference distances is itself uncertain (the true exceedance rate of
    natural data could be ~2%), and the slack keeps honest clients safe from that. alpha = 1e-6 per
    evaluation keeps false alarms rare although the test runs after every query of every client. The
    alarm then needs 11 of 50 queries, 21 of 200 (10.5%); the most any of 60 honest ECG clients x 2,000
    reached in any window was 8 of 200, and a pure random-query attacker is flagged at the 50th query, the
    minimum. An
    attacker diluting off-distribution rows among natural ones is caught once they exceed ~11% of its
    recent traffic.
    """

    name = "out_of_distribution"

    def __init__(self, profile: ReferenceProfile, *, quantile: float = 0.99, **window: Any) -> None:
        super().__init__(profile, **window)
        self.quantile = quantile
        self.distance_threshold = profile.nn_quantile(quantile)

    def config(self) -> dict[str, Any]:
        return {**self._window_config(), "quantile": self.quantile}

    def _fresh(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self._window_fresh()

    def _step(
        self,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        Z: np.ndarray,
        labels: np.ndarray,
        call: dict[str, Any],
    ) -> None:
        distances = _nearest(Z, self.profile.reference)
        self._record(meta, arrays, distances > self.distance_threshold, distances, call)

    def _result(
        self, meta: dict[str, Any], arrays: dict[str, np.ndarray], call: dict[str, Any]
    ) -> DetectorResult:
        typical = self.profile.nn_quantile(0.5)

        def describe(median: float) -> str:
            return (
                f"lie farther than {self.distance_threshold:.2f} from every reference sample (only "
                f"{1 - self.quantile:.0%} of reference samples are that far from their nearest neighbour; "
                f"median distance of these queries {median:.2f}, of reference samples {typical:.2f})"
            )

        return self._window_result(
            meta, arrays, call, describe, {"distance_threshold": self.distance_threshold}
        )


class NearDuplicateDetector(_WindowBinomialDetector):
    """``near_duplicates``: share of recent queries that nearly repeat one of the client's earlier queries.

    A query is flagged when its distance to the nearest of the client's previous ``history`` queries is
    below half the 1st percentile of the reference's leave-one-out nearest-neighbour distances: closer
    than natural samples come to each other. Half, not the percentile itself, because a client's history
    (up to 5,000 rows) is denser than the reference (a few hundred): with the plain 1st percentile 2-3%
    of natural ECG queries were flagged after 2,000 queries, and that rate grows with the history. At half
    of it, not one query of 60 honest ECG clients x 2,000 (nor of one client x 20,000) was flagged: the
    closest a natural query came to an earlier one was 1.16 against a threshold of 1.05 (standardised
    units; the ECG noise keeps natural windows apart; a stray flag would not matter, the window test
    needs 11 of 50), while a perturbation of 0.05 standard deviations
    on 80 features lies ~0.45 from its original and a JBDA step of 0.1 standard deviations ~0.9 from its
    parent. Exact repeats (retries) are not flagged, see REPEAT_TOLERANCE. The window test (200 queries,
    p0 = 3%, alpha = 1e-6: 11 of 50, 21 of 200) is that of ``out_of_distribution``; p0 is generous for a
    rate that is ~0 on natural data, so it is the attack share (half of all queries for perturbation
    pairs) that decides, not chance. State: the last ``history`` = 5,000 standardised queries as float32
    (1.6 MB at 80 features) plus the window; a near-duplicate of an older query is not seen.
    """

    name = "near_duplicates"

    def __init__(
        self,
        profile: ReferenceProfile,
        *,
        quantile: float = 0.01,
        factor: float = 0.5,
        history: int = 5000,
        **window: Any,
    ) -> None:
        super().__init__(profile, **window)
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.quantile, self.factor, self.history = quantile, factor, history
        self.distance_threshold = factor * profile.nn_quantile(quantile)

    def config(self) -> dict[str, Any]:
        return {
            **self._window_config(),
            "quantile": self.quantile,
            "factor": self.factor,
            "history": self.history,
        }

    def _fresh(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self._window_fresh()
        meta["repeats"] = 0
        arrays["history"] = np.zeros((0, self.profile.n_features), dtype=np.float32)
        return meta, arrays

    def _step(
        self,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        Z: np.ndarray,
        labels: np.ndarray,
        call: dict[str, Any],
    ) -> None:
        history = arrays["history"]
        n, m = Z.shape[0], history.shape[0]
        # Z holds float32 values already (`standardise` rounds them), as the stored history does.
        queries = Z.astype(np.float32)
        candidates = np.concatenate([history.astype(np.float32, copy=False), queries])
        # Query i sits at position m + i; it is compared with the `history` queries just before it only.
        # The product in float32 screens the pairs; the kernel takes the window, and computes exactly
        # every pair that may be a repeat or the nearest, so that distances, flags and repeats are
        # those of exact arithmetic however the rows were chunked (detector_kernels.nearest_earlier).
        nearest_squared = np.empty(n)
        repeat = np.empty(n, dtype=np.bool_)
        detector_kernels.nearest_earlier(
            queries @ candidates.T,
            queries,
            candidates,
            np.einsum("ij,ij->i", queries, queries, dtype=np.float64),
            np.einsum("ij,ij->i", candidates, candidates, dtype=np.float64),
            m,
            self.history,
            REPEAT_TOLERANCE_SQUARED,
            nearest_squared,
            repeat,
        )
        nearest = np.sqrt(nearest_squared)
        # The client's very first query has nothing to compare with (inf): not flagged, and kept as NaN
        # among the window's distances, which the explanation's median skips.
        meta["repeats"] = int(meta["repeats"]) + int(repeat.sum())
        flags = nearest < self.distance_threshold
        self._record(meta, arrays, flags, np.where(np.isfinite(nearest), nearest, np.nan), call)
        arrays["history"] = candidates[-self.history :].copy()

    def _result(
        self, meta: dict[str, Any], arrays: dict[str, np.ndarray], call: dict[str, Any]
    ) -> DetectorResult:
        natural = self.profile.nn_quantile(self.quantile)

        def describe(median: float) -> str:
            return (
                f"lie within {self.distance_threshold:.2f} of one of the client's own earlier queries (half "
                f"the distance {natural:.2f} that {1 - self.quantile:.0%} of natural samples keep from each "
                f"other; median distance of these queries to an earlier one {median:.2f})"
            )

        extra = {"distance_threshold": self.distance_threshold, "repeats": float(meta["repeats"])}
        return self._window_result(meta, arrays, call, describe, extra)


# -- PRADA -----------------------------------------------------------------------------------------------


class PradaDetector(_BaseDetector):
    """``prada``: Juuti et al., "PRADA: Protecting against DNN Model Stealing Attacks" (EuroS&P 2019).

    Per predicted class c a growing set G_c of the client's queries. For a query x of class c: if G_c is
    empty, x joins it; otherwise d = min distance from x to G_c is appended to the distance list D, and x
    joins G_c when d > T_c. As in the paper (and its reference code), T_c is per class and never
    decreases: T_c = max(T_c, mean(D_c) - std(D_c)), where D_c are the distances with which members joined
    G_c (0 for the first). Once D holds more than 100 distances, the Shapiro-Wilk W of D without the values
    beyond 3 standard deviations is computed; the test fails when W < ``delta``. ``score`` = 1 - W and
    ``threshold`` = 1 - delta, so that, as for the other detectors, score >= threshold alarms. The test
    is evaluated at every multiple of 50 queries and at the end of each update.

    One change to the paper, measured: W is computed on log(D), not D. Natural nearest-neighbour
    distances are right-skewed (ECG reference: median 4.6, 99th percentile 11.8), and early on, while
    the growing sets are small, they are larger still. On raw D, honest ECG clients reached W as low as
    0.79 (60 clients; 0.84 over the 10 of the acceptance test) while perturbation pairs and JBDA sat at
    0.77-0.81: no delta separates them. On log(D), honest clients stayed at W >= 0.94 (0.95 over the
    10), while perturbation pairs (0.80, or 0.64 with three noisy copies) and JBDA
    (0.73-0.83) stay far below: their step distances form a second mode far below the natural ones.
    delta = 0.90 sits between the two, inside the 0.87-0.96 range the paper used. ``log_distances=False``
    gives the paper's exact statistic. Uniform random queries give near-normal distances (in high
    dimension distances concentrate; W ~0.98), so PRADA misses them; ``out_of_distribution`` catches
    those.

    Bounded state: each G_c keeps its newest ``max_members`` = 1,000 members (FIFO, float32: at most
    1,000 x F x 4 bytes per class the model can predict), and the test uses the newest
    ``max_distances`` = 5,000 distances (the largest sample scipy's Shapiro-Wilk supports exactly). The
    running mean and deviation behind T_c cover every join ever made. Repeats of a member (distance
    below REPEAT_TOLERANCE) are skipped: a retried query is not evidence of anything and would put
    zeros into D.
    """

    name = "prada"
    min_distances = 100
    check_every = 50
    outlier_sigma = 3.0

    def __init__(
        self,
        profile: ReferenceProfile,
        *,
        delta: float = 0.90,
        log_distances: bool = True,
        max_members: int = 1000,
        max_distances: int = 5000,
    ) -> None:
        super().__init__(profile)
        if max_members < 1 or max_distances <= self.min_distances:
            raise ValueError(f"need max_members >= 1 and max_distances > {self.min_distances}")
        self.delta, self.log_distances = delta, log_distances
        self.max_members, self.max_distances = max_members, max_distances

    def config(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "log_distances": self.log_distances,
            "min_distances": self.min_distances,
            "check_every": self.check_every,
            "outlier_sigma": self.outlier_sigma,
            "max_members": self.max_members,
            "max_distances": self.max_distances,
        }

    def _fresh(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = self._meta(
            seen=0, distances_total=0, repeats=0, checks=0, alarm_checks=0, first_alarm_query=None, min_w=1.0
        )
        arrays = {
            "classes": np.zeros(0, dtype=np.int64),
            # Per class, in the order of "classes": joins, mean and M2 (Welford) of join distances, T_c.
            "join_count": np.zeros(0, dtype=np.int64),
            "join_mean": np.zeros(0, dtype=np.float64),
            "join_m2": np.zeros(0, dtype=np.float64),
            "threshold": np.zeros(0, dtype=np.float64),
            "distances": np.zeros(0, dtype=np.float64),
        }
        return meta, arrays

    def shapiro_w(self, distances: np.ndarray) -> float | None:
        """PRADA's statistic on the newest ``max_distances`` distances; None with too few of them."""
        D = np.asarray(distances, dtype=np.float64)[-self.max_distances :]
        if D.size <= self.min_distances:
            return None
        if self.log_distances:
            D = np.log(D)  # every recorded distance exceeds REPEAT_TOLERANCE > 0
        std = D.std()
        if std > 0:
            D = D[np.abs(D - D.mean()) <= self.outlier_sigma * std]
        if D.size < 3 or np.ptp(D) == 0:
            return 1.0  # no spread at all: W is undefined, and it is not PRADA's signature
        return shapiro_statistic(D)

    def _class_index(self, arrays: dict[str, np.ndarray], c: int) -> int:
        found = np.flatnonzero(arrays["classes"] == c)
        if found.size:
            return int(found[0])
        arrays["classes"] = np.append(arrays["classes"], c)
        arrays["join_count"] = np.append(arrays["join_count"], 0)
        for key in ("join_mean", "join_m2", "threshold"):
            arrays[key] = np.append(arrays[key], 0.0)
        arrays[f"members_{c}"] = np.zeros((0, self.profile.n_features), dtype=np.float32)
        return int(arrays["classes"].size - 1)

    def _grow_class(self, arrays: dict[str, np.ndarray], c: int, Zc: np.ndarray) -> tuple[np.ndarray, int]:
        """Run PRADA's growing-set rule over class c's new queries in order.

        Distances to the stored members and among the new queries come from two matrix products; the
        sequential part (minima over the members active at each step, joins, evictions) is the
        compiled `detector_kernels.grow_members`. Returns each query's distance d (NaN where none is
        recorded: first member, or a repeat) and the number of repeats.
        """
        k = self._class_index(arrays, c)
        old = arrays[f"members_{c}"].astype(np.float64)
        n = Zc.shape[0]
        # Squared distances; d is the square root of their minimum (see squared_distances).
        to_old = squared_distances(Zc, old) if old.shape[0] else np.zeros((n, 0))
        to_new = squared_distances(Zc, Zc)
        running = np.array(
            [arrays["join_count"][k], arrays["join_mean"][k], arrays["join_m2"][k], arrays["threshold"][k]],
            dtype=np.float64,
        )
        d_out = np.full(n, np.nan)
        joined = np.empty(n, dtype=np.int64)  # local indices of the new queries that joined, in order
        repeats, n_joined, old_start, joined_start = detector_kernels.grow_members(
            to_old, to_new, self.max_members, REPEAT_TOLERANCE, running, d_out, joined
        )
        arrays["join_count"][k] = int(running[0])
        arrays["join_mean"][k], arrays["join_m2"][k], arrays["threshold"][k] = running[1:]
        arrays[f"members_{c}"] = np.concatenate([old[old_start:], Zc[joined[joined_start:n_joined]]]).astype(
            np.float32
        )
        return d_out, int(repeats)

    def _step(
        self,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        Z: np.ndarray,
        labels: np.ndarray,
        call: dict[str, Any],
    ) -> None:
        n = Z.shape[0]
        d_new = np.full(n, np.nan)
        # G_c and T_c depend only on class c's own queries, so each class is processed in one pass and
        # D is then assembled in arrival order.
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            d_new[rows], repeats = self._grow_class(arrays, int(c), Z[rows])
            meta["repeats"] = int(meta["repeats"]) + repeats
        seen0 = int(meta["seen"])
        recorded = np.isfinite(d_new)
        before = arrays["distances"]
        combined = np.concatenate([before, d_new[recorded]])
        # The test at every multiple of check_every queries inside this block.
        recorded_so_far = np.cumsum(recorded)
        for position in np.flatnonzero((seen0 + np.arange(1, n + 1)) % self.check_every == 0):
            W = self.shapiro_w(combined[: before.size + int(recorded_so_far[position])])
            if W is None:
                continue
            meta["checks"] = int(meta["checks"]) + 1
            meta["min_w"] = min(float(meta["min_w"]), W)
            if W < self.delta:
                meta["alarm_checks"] = int(meta["alarm_checks"]) + 1
                query = seen0 + int(position) + 1
                if meta["first_alarm_query"] is None:
                    meta["first_alarm_query"] = query
                if not call["alarm"] or W < call["worst_w"]:
                    call.update(alarm=True, worst_w=W, worst_query=query)
        meta["seen"] = seen0 + n
        meta["distances_total"] = int(meta["distances_total"]) + int(recorded.sum())
        arrays["distances"] = combined[-self.max_distances :]

    def _result(
        self, meta: dict[str, Any], arrays: dict[str, np.ndarray], call: dict[str, Any]
    ) -> DetectorResult:
        seen = int(meta["seen"])
        D = arrays["distances"]
        W = self.shapiro_w(D)
        threshold = 1.0 - self.delta
        members = sum(int(arrays[f"members_{int(c)}"].shape[0]) for c in arrays["classes"])
        details: dict[str, float] = {
            "delta": self.delta,
            "distances": float(D.size),
            "distances_total": float(meta["distances_total"]),
            "growing_set_size": float(members),
            "classes": float(arrays["classes"].size),
            "repeats": float(meta["repeats"]),
            "checks": float(meta["checks"]),
            "alarm_checks": float(meta["alarm_checks"]),
            "min_shapiro_w": float(meta["min_w"]),
        }
        if meta["first_alarm_query"] is not None:
            details["first_alarm_query"] = float(meta["first_alarm_query"])
        of = "log-distances" if self.log_distances else "distances"
        if W is None:
            score, end_alarm = 0.0, False
            sentence = (
                f"Only {D.size} distances between the client's queries so far ({seen} queries); PRADA's "
                f"normality test needs more than {self.min_distances}."
            )
        else:
            median = float(np.median(D))
            details.update(shapiro_w=W, median_distance=median)
            score, end_alarm = 1.0 - W, W < self.delta
            verdict = "ALARM: " if end_alarm else ""
            relation = "below" if end_alarm else "above"
            article = "the" if end_alarm else "The"
            sentence = (
                f"{verdict}{article} {of} between each of the client's queries and its earlier queries "
                f"of the same class ({D.size} distances, median {median:.2f}) have Shapiro-Wilk "
                f"W = {W:.3f}, {relation} delta = {self.delta:.2f} (score 1 - W = {score:.3f}, threshold "
                f"{threshold:.2f}; {members} queries in the growing sets)."
            )
        if call["alarm"] and not end_alarm:
            details.update(alarm_check_query=float(call["worst_query"]), alarm_check_w=float(call["worst_w"]))
            sentence += (
                f" ALARM earlier in this update: W = {call['worst_w']:.3f} < {self.delta:.2f} after query "
                f"{call['worst_query']}."
            )
        return DetectorResult(
            detector=self.name,
            score=score,
            threshold=threshold,
            alarm=bool(end_alarm or call["alarm"]),
            explanation=sentence,
            queries_seen=seen,
            details=details,
        )


def default_detectors(profile: ReferenceProfile) -> list[Detector]:
    """The detectors the auditor runs on every client: prada, out_of_distribution, near_duplicates."""
    return [PradaDetector(profile), OutOfDistributionDetector(profile), NearDuplicateDetector(profile)]
