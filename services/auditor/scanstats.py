"""Statistics of suspect scans: is a suspect endpoint a copy of our model, with a calibrated p-value?

Pure functions over arrays; probing, storage and reports live elsewhere. Four tests, each with a null
distribution we can actually sample, because raw agreement with the victim is not evidence (any accurate
independent model agrees with it most of the time; see the research handbook):

- ``label_replay``: a surrogate has fitted the very queries its thief sent, so on a client's replayed
  queries it disagrees with the victim far less often than on fresh control inputs. Independent reference
  models (trained on true labels only) give the null ratio of the two disagreement rates.
- ``watermark_replay``: on the replayed queries a soft-label surrogate reproduces the keyed perturbation
  we returned for exactly those inputs. The same statistic under random keys is the null.
- ``output_replay``: a distilled surrogate's probabilities are far closer to ours on the thief's own
  queries than on control inputs (it fitted them); reference models give the null contrast. Catches
  soft-label thieves whose labels and watermark are too weak (e.g. random-forest regressors).
- ``reference_agreement``: on control inputs where the victim is wrong, how often the suspect repeats the
  victim's mistake, against the reference models. Accuracy alone cannot inflate it.
- ``output_distance``: copied weights (exact, quantised) give outputs far closer to the victim's clean
  probabilities than any independently trained model.

The scan's verdict controls the family-wise error over all applicable tests with Holm-Bonferroni.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from shared.fingerprint import FingerprintScheme

__all__ = [
    "ReferenceKit",
    "ReplaySet",
    "ScanOutcome",
    "SuspectAnswers",
    "TestResult",
    "build_reference_kit",
    "holm_adjust",
    "run_scan_tests",
]

# Below this many rows a replay set carries too little information for the watermark correlation.
MIN_WATERMARK_ROWS = 20
# The error-agreement test needs a few victim mistakes among the control inputs to say anything.
MIN_VICTIM_ERRORS = 5
# Reference models learn from ~150 rows, so they sit farther from the victim than a competitor with more
# data would. Their log-distances' spread is therefore not trusted below one nat (a factor e): a suspect
# must be ~e^3.5 = 33 times closer than typical reference models before this test reaches p < 0.00025.
MIN_LOG_DISTANCE_SD = 1.0
# Probabilities below this are left out of the watermark correlation (their logits are surrogate noise).
WATERMARK_LOG_FLOOR = 1e-4
# Exact copies have distance 0; the floor keeps the log finite.
DISTANCE_FLOOR = 1e-12
# Per-row distances below this (float rounding, fingerprint noise on confident rows) count as equal.
LOG_DISTANCE_FLOOR = 1e-6
# Output replay: the reference models (few rows, nine models) are not quite the population of independent
# models a suspect comes from; their mean contrast may be off by about this much (nats) for a given suspect.
# From 300 independent-model tests offline (ECG and digits, 5 trials each; `modelprint experiment
# calibrate`, docs/results/calibration-*): without it 9 fell below p 0.01 and one reached 2.4e-4; with
# 0.05, 2 (smallest 0.0067); with 0.1, none (smallest 0.016), at the cost of 3 of 100 soft-label ECG
# surrogates that output_replay alone no longer catches at p < 0.001 (60/100 instead of 63/100).
OUTPUT_REPLAY_BIAS_SD = 0.1
# Gauss-Hermite nodes for averaging the label-replay p-value over the uncertain null rate ratio.
_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(40)


@dataclass(frozen=True)
class SuspectAnswers:
    """What the suspect returned for a probe set, in the victim's class order."""

    labels: np.ndarray
    probabilities: np.ndarray | None


@dataclass(frozen=True)
class ReplaySet:
    """One client's logged queries, replayed to the suspect."""

    client_id: int
    inputs: np.ndarray
    suspect: SuspectAnswers


@dataclass(frozen=True)
class TestResult:
    """One statistical test of a scan, with its null distribution for plots."""

    __test__ = False  # not a pytest test class despite its name

    name: str
    applicable: bool
    statistic: float | None
    p_value: float | None
    p_value_empirical: float | None
    p_value_parametric: float | None
    explanation: str
    observed: float | None
    null_samples: list[float]
    details: dict[str, float | int | str]


@dataclass(frozen=True)
class ReferenceKit:
    """Independent reference models and held-out control inputs, built once per model version."""

    models: list[Any]
    control_inputs: np.ndarray
    names: list[str]
    # True class indices of the control inputs (victim order); needed to find the victim's mistakes.
    control_labels: np.ndarray | None = None


@dataclass(frozen=True)
class ScanOutcome:
    """Verdict of a scan with the family-wise adjusted p-value and every test."""

    verdict: str
    p_value: float
    level: float
    tests: list[TestResult]
    explanation: str


def _reference_estimators(seed: int) -> list[tuple[str, Any]]:
    """Several families, two seeds or settings each where cheap, so the null spans model variation."""

    def scaled(step: Any) -> Pipeline:
        return Pipeline([("scale", StandardScaler()), ("model", step)])

    return [
        (
            f"mlp(64,32) seed {seed}",
            scaled(MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=500, random_state=seed)),
        ),
        (
            f"mlp(64,32) seed {seed + 1}",
            scaled(MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=500, random_state=seed + 1)),
        ),
        (f"random forest seed {seed}", RandomForestClassifier(200, random_state=seed, n_jobs=2)),
        (f"random forest seed {seed + 1}", RandomForestClassifier(200, random_state=seed + 1, n_jobs=2)),
        ("logistic regression C=1", scaled(LogisticRegression(C=1.0, max_iter=2000))),
        ("logistic regression C=0.1", scaled(LogisticRegression(C=0.1, max_iter=2000))),
        (f"gradient boosting seed {seed}", HistGradientBoostingClassifier(max_iter=100, random_state=seed)),
        ("k-NN k=5", scaled(KNeighborsClassifier(5))),
        ("k-NN k=15", scaled(KNeighborsClassifier(15))),
    ]


def build_reference_kit(X_ref: np.ndarray, y_ref: np.ndarray, classes: list, seed: int = 0) -> ReferenceKit:
    """Train independent reference models on half of the reference data; keep the rest as control probes."""
    X = np.asarray(X_ref, dtype=np.float64)
    index_of = {label: i for i, label in enumerate(classes)}
    unknown = sorted({str(v) for v in np.asarray(y_ref).tolist() if v not in index_of})
    if unknown:
        raise ValueError(f"reference labels not among the model's classes: {', '.join(unknown[:5])}")
    y = np.array([index_of[v] for v in np.asarray(y_ref).tolist()], dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes))
    # Stratify when every present class has two rows, so both halves see every class.
    stratify = y if np.all(counts[counts > 0] >= 2) else None
    X_train, X_control, y_train, y_control = train_test_split(
        X, y, test_size=0.5, random_state=seed, stratify=stratify
    )
    models, names = [], []
    for name, estimator in _reference_estimators(seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            estimator.fit(X_train, y_train)
        models.append(estimator)
        names.append(name)
    return ReferenceKit(models=models, control_inputs=X_control, names=names, control_labels=y_control)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        # Step-down: the k-th smallest is multiplied by (m - k + 1), kept monotone.
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        adjusted[i] = running
    return adjusted.tolist()


def _full_proba(model: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with one column per victim class, even if the model never saw some class."""
    out = np.zeros((X.shape[0], n_classes))
    if X.shape[0] == 0:
        return out  # sklearn refuses empty batches
    raw = np.asarray(model.predict_proba(X), dtype=np.float64)
    out[:, np.asarray(model.classes_, dtype=np.int64)] = raw
    return out


def _victim_proba(victim: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """The victim's clean probabilities (its own column order), tolerating an empty batch."""
    if X.shape[0] == 0:
        return np.zeros((0, n_classes))
    return np.asarray(victim.predict_proba(X), dtype=np.float64)


def _runner_up_profile(probs: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Each row's probabilities over the classes other than `top`, renormalised (zeros if none is left)."""
    rest = probs.copy()
    rest[np.arange(probs.shape[0]), top] = 0.0
    total = rest.sum(axis=1, keepdims=True)
    profile: np.ndarray = rest / np.where(total > 0, total, 1.0)
    return profile


def _decision_p(parametric: float, empirical: float, beyond_all: bool) -> float:
    """The parametric tail reaches below the empirical floor only when every null sample agrees."""
    return parametric if beyond_all else max(parametric, empirical)


def _not_applicable(name: str, why: str, details: dict[str, float | int | str] | None = None) -> TestResult:
    return TestResult(name, False, None, None, None, None, why, None, [], dict(details or {}))


def _log_rate_ratio(d_replay: int, m: int, d_control: int, n: int) -> tuple[float, float]:
    """Log ratio of disagreement rates (replay / control), with 0.5 continuity, and its sampling variance."""
    value = math.log((d_replay + 0.5) / (m + 0.5)) - math.log((d_control + 0.5) / (n + 0.5))
    variance = 1 / (d_replay + 0.5) - 1 / (m + 0.5) + 1 / (d_control + 0.5) - 1 / (n + 0.5)
    return value, variance


def _label_replay_test(
    name: str,
    replay_labels: np.ndarray,
    victim_replay: np.ndarray,
    ref_replay: list[np.ndarray],
    control_labels: np.ndarray,
    victim_control: np.ndarray,
    ref_control: list[np.ndarray],
    true_labels: np.ndarray | None,
) -> TestResult:
    """Fewer disagreements on the replayed queries than on control, beyond what reference models show,
    and fewer than a model trained on the same queries with their true labels could have.

    Two ways of not being a copy must both be ruled out. (1) An independent model: the reference models
    give the null ratio of the replay and control disagreement rates. (2) A competitor that holds the
    same inputs with true labels (e.g. the client's own records, also sent to us) fits them too, so it
    disagrees with us on the replayed rows where we are wrong. How likely we are wrong on a row is read
    off the labelled control inputs (`true_labels`), by how many reference models disagree with us there
    (see `_true_label_floor_p`). The p-value is the larger of the two.
    """
    m, n = victim_replay.size, victim_control.size
    if m == 0 or n == 0:
        return _not_applicable(name, "No replayed rows or no control answers.")
    d_replay = int(np.sum(replay_labels != victim_replay))
    d_control = int(np.sum(control_labels != victim_control))
    observed, _ = _log_rate_ratio(d_replay, m, d_control, n)
    ref_ratios, ref_variances = zip(
        *(
            _log_rate_ratio(int(np.sum(r != victim_replay)), m, int(np.sum(c != victim_control)), n)
            for r, c in zip(ref_replay, ref_control, strict=True)
        ),
        strict=True,
    )
    null = np.asarray(ref_ratios)
    k = null.size
    # Null for the suspect's rate ratio rho: log rho ~ N(mean, tau^2 + se^2), where tau^2 is the
    # between-model spread beyond the references' own sampling noise (method of moments) and se^2 the
    # uncertainty of the mean. The replayed set may be easier or harder than the control set; rho
    # carries that, so the suspect is compared with what independent models show on the same rows.
    spread = float(np.var(null, ddof=1)) if k > 1 else 1.0
    tau2 = max(0.0, spread - float(np.mean(ref_variances)))
    mu, sd = float(np.mean(null)), math.sqrt(tau2 + spread / k)
    total = d_replay + d_control
    if total == 0:
        # No disagreement anywhere (e.g. an exact copy): the replayed rows are not special.
        parametric = 1.0
    else:
        # Given the total, the replay count of two Poisson counts with rate ratio rho is binomial with
        # success probability m*rho / (m*rho + n) (the exact comparison of two rates); average that tail
        # over the null distribution of rho.
        rho = np.exp(mu + sd * _HERMITE_NODES)
        success = m * rho / (m * rho + n)
        tails = stats.binom.cdf(d_replay, total, success)
        parametric = float(np.sum(_HERMITE_WEIGHTS * tails) / np.sum(_HERMITE_WEIGHTS))
    empirical = (1 + int(np.sum(null <= observed))) / (k + 1)
    p_independent = _decision_p(parametric, empirical, bool(np.all(null > observed)))
    floor_rate, p_floor = _true_label_floor_p(
        d_replay, victim_replay, ref_replay, victim_control, ref_control, true_labels
    )
    p = max(p_independent, p_floor)
    agree_replay, agree_control = 1 - d_replay / m, 1 - d_control / n
    ref_gap = float(
        np.mean(
            [
                np.mean(r == victim_replay) - np.mean(c == victim_control)
                for r, c in zip(ref_replay, ref_control, strict=True)
            ]
        )
    )
    explanation = (
        f"The suspect disagrees with our labels on {d_replay} of {m} replayed queries and {d_control} of "
        f"{n} control inputs (rate ratio {math.exp(observed):.3g}); independent reference models show a "
        f"ratio of {math.exp(mu):.3g} (range {math.exp(null.min()):.3g}-{math.exp(null.max()):.3g}), "
        f"p = {p_independent:.3g}."
    )
    if true_labels is not None:
        explanation += (
            f" A model trained on these queries with their true labels would still disagree where we are "
            f"wrong (about {floor_rate:.1%} of these rows, judged by how many reference models disagree "
            f"with us on each and how often we are wrong on such labelled control inputs), "
            f"p = {p_floor:.3g}; the test reports the larger, p = {p:.3g}."
        )
    return TestResult(
        name,
        True,
        observed,
        p,
        empirical,
        parametric,
        explanation,
        observed,
        null.tolist(),
        {
            "replay_rows": m,
            "control_rows": n,
            "disagree_replay": d_replay,
            "disagree_control": d_control,
            "agreement_replay": agree_replay,
            "agreement_control": agree_control,
            "agreement_gap": agree_replay - agree_control,
            "reference_mean_gap": ref_gap,
            "null_log_ratio_mean": mu,
            "null_log_ratio_sd": sd,
            "reference_models": k,
            "p_independent": p_independent,
            "p_true_label_floor": p_floor,
            "true_label_floor_rate": floor_rate,
        },
    )


def _true_label_floor_p(
    d_replay: int,
    victim_replay: np.ndarray,
    ref_replay: list[np.ndarray],
    victim_control: np.ndarray,
    ref_control: list[np.ndarray],
    true_labels: np.ndarray | None,
    draws: int = 200,
) -> tuple[float, float]:
    """P(at most d_replay disagreements on the replayed rows) for a perfect fit of their true labels.

    Such a model disagrees with us exactly where we are wrong. Where we are wrong is unknown on the
    replayed rows, but how many reference models disagree with us on a row tells how likely it is: on
    the labelled control inputs, our error rate is estimated among rows where no, a minority or a
    majority of references disagree with us (Jeffreys posterior). The disagreement count is then a sum
    of binomials, one per group;
    its lower tail is averaged over `draws` posterior draws of the rates (fixed seed). Returns (expected
    disagreement rate, p); without labelled controls, (0, 0), and the test rests on the first null.
    """
    if true_labels is None or victim_replay.size == 0:
        return 0.0, 0.0

    # Three groups: no reference disagrees with us, a minority does, a majority does. Finer groups would
    # leave too few labelled control rows per group, and the prior would then inflate their rates.
    def group(refs: list[np.ndarray], victim: np.ndarray) -> np.ndarray:
        dissent = np.mean([r != victim for r in refs], axis=0)
        return np.digitize(dissent, [1e-9, 0.5 + 1e-9])

    group_control, group_replay = group(ref_control, victim_control), group(ref_replay, victim_replay)
    wrong = (victim_control != true_labels).astype(np.float64)
    errors = np.bincount(group_control, weights=wrong, minlength=3)
    totals = np.bincount(group_control, minlength=3)
    rows_per_bin = np.bincount(group_replay, minlength=3)
    used = np.flatnonzero(rows_per_bin)
    rng = np.random.default_rng(0)
    rates = rng.beta(errors[used] + 0.5, totals[used] - errors[used] + 0.5, size=(draws, used.size))
    tails = np.empty(draws)
    counts = np.arange(d_replay + 1)
    for draw in range(draws):
        # Distribution of the total, truncated at d_replay (only its lower tail is needed).
        pmf = np.ones(1)
        for rows, rate in zip(rows_per_bin[used], rates[draw], strict=True):
            pmf = np.convolve(pmf, stats.binom.pmf(counts, rows, rate))[: d_replay + 1]
        tails[draw] = min(1.0, float(pmf.sum()))
    expected = float(np.mean(rates @ rows_per_bin[used]) / victim_replay.size)
    return expected, float(tails.mean())


def _output_replay_test(
    name: str,
    replay_probs: np.ndarray | None,
    replay_clean: np.ndarray,
    control_probs: np.ndarray | None,
    control_clean: np.ndarray,
    ref_replay_probs: list[np.ndarray],
    ref_control_probs: list[np.ndarray],
) -> TestResult:
    """Suspect closer to our outputs on the replayed queries than on control, beyond reference models."""
    if replay_probs is None or control_probs is None:
        return _not_applicable(name, "The suspect returns labels only: no output distances.")
    replay_probs = np.asarray(replay_probs, dtype=np.float64)
    control_probs = np.asarray(control_probs, dtype=np.float64)
    ok_replay = np.all(np.isfinite(replay_probs), axis=1)
    ok_control = np.all(np.isfinite(control_probs), axis=1)
    if ok_replay.sum() < 2 or ok_control.sum() < 2:
        return _not_applicable(name, "Too few replayed or control answers with probabilities.")

    if replay_clean.shape[1] < 3:
        return _not_applicable(
            name, "With two classes the answer beyond its label is one number: no profile."
        )

    def log_tv(p: np.ndarray, clean: np.ndarray, ok: np.ndarray) -> np.ndarray:
        # Only how the rest of the probability is split among the runner-up classes counts: a model trained
        # on the same inputs with its own true labels fits their labels and confidence too, but only our
        # answers teach the split. Per-row log distance: confident and uncertain rows weigh alike.
        top = np.argmax(clean[ok], axis=1)
        gap = _runner_up_profile(p[ok], top) - _runner_up_profile(clean[ok], top)
        tv: np.ndarray = np.log(0.5 * np.abs(gap).sum(axis=1) + LOG_DISTANCE_FLOOR)
        return tv

    def contrast(p_replay: np.ndarray, p_control: np.ndarray) -> float:
        r, c = log_tv(p_replay, replay_clean, ok_replay), log_tv(p_control, control_clean, ok_control)
        return float(r.mean() - c.mean())

    # A distilled surrogate has fitted its training targets, so it sits much closer to our outputs on the
    # thief's own queries than on fresh rows; an independent model does not care which rows a client sent.
    # The null is "one more independent model": the reference models' contrasts on these same rows are a
    # sample of that population, so the suspect's contrast is judged against their predictive
    # distribution, Student's t with k - 1 degrees of freedom scaled by sqrt(s^2 (1 + 1/k) + b^2), b the
    # allowance for the reference models' bias (OUTPUT_REPLAY_BIAS_SD). A normal fit
    # with a between-model variance (the earlier null) trusted the tail of nine heterogeneous models too
    # far and called an independent random forest stolen (docs/results.md).
    observed = contrast(replay_probs, control_probs)
    null = np.array([contrast(r, c) for r, c in zip(ref_replay_probs, ref_control_probs, strict=True)])
    k = null.size
    if k < 3:
        return _not_applicable(name, "Fewer than three reference models: no null spread for the contrast.")
    mu = float(null.mean())
    sd = math.sqrt(float(np.var(null, ddof=1)) * (1 + 1 / k) + OUTPUT_REPLAY_BIAS_SD**2)
    zscore = (observed - mu) / sd
    parametric = float(stats.t.cdf(zscore, df=k - 1))
    empirical = (1 + int(np.sum(null <= observed))) / (k + 1)
    p = _decision_p(parametric, empirical, bool(np.all(null > observed)))
    explanation = (
        f"On the replayed queries the suspect's outputs are {math.exp(-observed):.3g} times closer to ours "
        f"(geometric mean total variation) than on control inputs; independent reference models: "
        f"{math.exp(-null.max()):.3g}-{math.exp(-null.min()):.3g} times, p = {p:.3g}."
    )
    return TestResult(
        name,
        True,
        observed,
        p,
        empirical,
        parametric,
        explanation,
        observed,
        null.tolist(),
        {
            "replay_rows": int(ok_replay.sum()),
            "control_rows": int(ok_control.sum()),
            "t": zscore,
            "degrees_of_freedom": k - 1,
            "null_mean": mu,
            "predictive_sd": sd,
            "reference_models": k,
        },
    )


def _centred_log(probabilities: np.ndarray) -> np.ndarray:
    """log(p) floored at WATERMARK_LOG_FLOOR, minus the row mean: logits up to the softmax's free constant."""
    logs = np.log(np.clip(probabilities, WATERMARK_LOG_FLOOR, 1.0))
    centred: np.ndarray = logs - logs.mean(axis=1, keepdims=True)
    return centred


def _watermark_replay_test(
    name: str,
    inputs: np.ndarray,
    answers: SuspectAnswers,
    clean: np.ndarray,
    scheme: FingerprintScheme,
    key: bytes,
    n_null_keys: int,
    rng: np.random.Generator,
) -> TestResult:
    """Correlation of the suspect's logit residual with the keyed logit shift, against random keys."""
    if answers.probabilities is None:
        return _not_applicable(name, "The suspect returns labels only, so the watermark cannot be read.")
    suspect = np.asarray(answers.probabilities, dtype=np.float64)
    usable = np.all(np.isfinite(suspect), axis=1)
    if int(usable.sum()) < MIN_WATERMARK_ROWS:
        return _not_applicable(name, f"Fewer than {MIN_WATERMARK_ROWS} replayed rows with probabilities.")
    inputs, suspect, clean = inputs[usable], suspect[usable], clean[usable]
    # The residual is how the suspect's logits differ from our clean model's on the rows we answered. A
    # surrogate's own approximation error dominates it; the keyed shift we returned hides in it. Classes
    # the victim gives less than the floor are left out: their logits are noise in any surrogate (and get
    # clipped by rounding on the wire). Nothing here looks at the key, so random keys stay a valid null.
    weights = clean > WATERMARK_LOG_FLOOR
    residual = (_centred_log(suspect) - _centred_log(clean))[weights]
    residual = residual - residual.mean()
    residual_norm = float(np.linalg.norm(residual))

    def correlation(candidate_key: bytes) -> float:
        shift = scheme.apply(clean, inputs, candidate_key).logit_shift
        marked = (shift - shift.mean(axis=1, keepdims=True))[weights]
        marked = marked - marked.mean()
        norm = float(np.linalg.norm(marked)) * residual_norm
        return float(residual @ marked) / norm if norm > 0 else 0.0

    observed = correlation(key)
    null = np.array([correlation(rng.bytes(32)) for _ in range(n_null_keys)])
    null_sd = float(null.std(ddof=1)) if null.size > 1 else 0.0
    zscore = (observed - float(null.mean())) / null_sd if null_sd > 0 else 0.0
    parametric = float(stats.norm.sf(zscore))
    exceed = int(np.sum(null >= observed))
    empirical = (1 + exceed) / (n_null_keys + 1)
    p = _decision_p(parametric, empirical, exceed == 0)
    explanation = (
        f"On {inputs.shape[0]} replayed queries the suspect's outputs follow the keyed shift we returned "
        f"({scheme.name}) with correlation {observed:.3f} (z = {zscore:.2f} against {n_null_keys} random "
        f"keys, of which "
        f"{exceed} reach it), p = {p:.3g}."
    )
    return TestResult(
        name,
        True,
        observed,
        p,
        empirical,
        parametric,
        explanation,
        observed,
        null.tolist(),
        {
            "rows": int(inputs.shape[0]),
            "scheme": scheme.name,
            "z": zscore,
            "null_mean": float(null.mean()),
            "null_sd": null_sd,
            "null_keys": n_null_keys,
            "null_exceeding": exceed,
        },
    )


def _reference_agreement_test(
    control_labels: np.ndarray,
    victim_control: np.ndarray,
    ref_control: list[np.ndarray],
    true_labels: np.ndarray | None,
) -> TestResult:
    """How often the suspect repeats the victim's mistakes on control inputs, against reference models."""
    name = "reference_agreement"
    if true_labels is None:
        return _not_applicable(name, "The reference kit has no true labels for its control inputs.")
    raw_agreement = float(np.mean(control_labels == victim_control)) if control_labels.size else 0.0
    mistakes = victim_control != true_labels
    e = int(mistakes.sum())
    if e < MIN_VICTIM_ERRORS:
        return _not_applicable(
            name,
            f"Only {e} victim mistakes among the control answers ({MIN_VICTIM_ERRORS} needed).",
            {"raw_agreement": raw_agreement, "victim_mistakes": e},
        )
    # Agreement where the victim is right only measures the suspect's accuracy (a better independent model
    # agrees more); repeating the victim's wrong answers does not grow with accuracy.
    observed = float(np.mean(control_labels[mistakes] == victim_control[mistakes]))
    null = np.array([float(np.mean(c[mistakes] == victim_control[mistakes])) for c in ref_control])
    k = null.size
    # Spread of the references plus the suspect's worst-case binomial noise on e rows (conservative).
    sd = math.sqrt((float(np.var(null, ddof=1)) if k > 1 else 0.0) + 0.25 / e)
    zscore = (observed - float(null.mean())) / sd
    parametric = float(stats.norm.sf(zscore))
    empirical = (1 + int(np.sum(null >= observed))) / (k + 1)
    p = _decision_p(parametric, empirical, bool(np.all(null < observed)))
    suspect_accuracy = float(np.mean(control_labels == true_labels))
    explanation = (
        f"On the {e} control inputs where our model is wrong, the suspect repeats its answer on "
        f"{observed:.0%} of them; independent reference models do on {null.min():.0%}-{null.max():.0%} "
        f"(mean {null.mean():.0%}), p = {p:.3g}. Raw agreement {raw_agreement:.1%} is not used as evidence."
    )
    return TestResult(
        name,
        True,
        observed,
        p,
        empirical,
        parametric,
        explanation,
        observed,
        null.tolist(),
        {
            "victim_mistakes": e,
            "control_rows": int(control_labels.size),
            "raw_agreement": raw_agreement,
            "suspect_accuracy": suspect_accuracy,
            "victim_accuracy": float(np.mean(~mistakes)),
            "z": zscore,
        },
    )


def _output_distance_test(
    suspect_probs: np.ndarray | None, victim_clean: np.ndarray, ref_probs: list[np.ndarray]
) -> TestResult:
    """Mean total-variation distance to the victim's clean probabilities, small = copied weights."""
    name = "output_distance"
    if suspect_probs is None:
        return _not_applicable(name, "The suspect returns labels only: no output distance.")
    probs = np.asarray(suspect_probs, dtype=np.float64)
    usable = np.all(np.isfinite(probs), axis=1)
    if not usable.any():
        return _not_applicable(name, "No control answer carried finite probabilities.")

    def mean_tv(p: np.ndarray) -> float:
        return float(0.5 * np.abs(p[usable] - victim_clean[usable]).sum(axis=1).mean())

    observed = mean_tv(probs)
    null = np.array([mean_tv(r) for r in ref_probs])
    log_null = np.log(null + DISTANCE_FLOOR)
    log_obs = math.log(observed + DISTANCE_FLOOR)
    sd = max(float(np.std(log_null, ddof=1)) if null.size > 1 else 0.0, MIN_LOG_DISTANCE_SD)
    zscore = (log_obs - float(log_null.mean())) / sd
    parametric = float(stats.norm.cdf(zscore))
    empirical = (1 + int(np.sum(null <= observed))) / (null.size + 1)
    p = _decision_p(parametric, empirical, bool(np.all(null > observed)))
    explanation = (
        f"The suspect's probabilities are at mean total-variation distance {observed:.3g} from our clean "
        f"outputs on {int(usable.sum())} control inputs; independent reference models are at "
        f"{null.min():.3g}-{null.max():.3g}, p = {p:.3g}."
    )
    return TestResult(
        name,
        True,
        observed,
        p,
        empirical,
        parametric,
        explanation,
        observed,
        null.tolist(),
        {"rows": int(usable.sum()), "z": zscore, "null_log_mean": float(log_null.mean()), "null_log_sd": sd},
    )


def _with_adjusted(test: TestResult, adjusted: float | None) -> TestResult:
    details = dict(test.details)
    if adjusted is not None:
        details["p_value_adjusted"] = adjusted
    return TestResult(
        test.name,
        test.applicable,
        test.statistic,
        test.p_value,
        test.p_value_empirical,
        test.p_value_parametric,
        test.explanation,
        test.observed,
        test.null_samples,
        details,
    )


def run_scan_tests(
    victim: Any,
    key: bytes,
    scheme: FingerprintScheme,
    kit: ReferenceKit,
    control: SuspectAnswers,
    replays: list[ReplaySet],
    level: float = 0.001,
    n_null_keys: int = 1000,
    rng: np.random.Generator | None = None,
    min_control_probes: int = 50,
) -> ScanOutcome:
    """Run every applicable test on a suspect's answers and decide with Holm-adjusted p-values."""
    rng = rng if rng is not None else np.random.default_rng()
    # The control answers cover the first rows of the control inputs (a probe may have been cut short).
    n_control = min(int(np.asarray(control.labels).shape[0]), kit.control_inputs.shape[0])
    control_inputs = kit.control_inputs[:n_control]
    control_labels = np.asarray(control.labels, dtype=np.int64)[:n_control]
    control_probs = None if control.probabilities is None else np.asarray(control.probabilities)[:n_control]
    true_labels = None if kit.control_labels is None else np.asarray(kit.control_labels)[:n_control]

    n_classes = len(victim.classes_)
    victim_clean = _victim_proba(victim, control_inputs, n_classes)
    victim_control = np.argmax(victim_clean, axis=1)
    ref_probs = [_full_proba(model, control_inputs, n_classes) for model in kit.models]
    ref_control = [np.argmax(p, axis=1) for p in ref_probs]

    tests: list[TestResult] = []
    for replay in replays:
        suffix = f"[client {replay.client_id}]"
        inputs = np.asarray(replay.inputs, dtype=np.float64)
        replay_clean = _victim_proba(victim, inputs, n_classes)
        victim_replay = np.argmax(replay_clean, axis=1)
        ref_replay_probs = [_full_proba(model, inputs, n_classes) for model in kit.models]
        ref_replay = [np.argmax(p, axis=1) for p in ref_replay_probs]
        tests.append(
            _label_replay_test(
                f"label_replay{suffix}",
                np.asarray(replay.suspect.labels, dtype=np.int64),
                victim_replay,
                ref_replay,
                control_labels,
                victim_control,
                ref_control,
                true_labels,
            )
        )
        tests.append(
            _watermark_replay_test(
                f"watermark_replay{suffix}",
                inputs,
                replay.suspect,
                replay_clean,
                scheme,
                key,
                n_null_keys,
                rng,
            )
        )
        tests.append(
            _output_replay_test(
                f"output_replay{suffix}",
                replay.suspect.probabilities,
                replay_clean,
                control_probs,
                victim_clean,
                ref_replay_probs,
                ref_probs,
            )
        )
    tests.append(_reference_agreement_test(control_labels, victim_control, ref_control, true_labels))
    tests.append(_output_distance_test(control_probs, victim_clean, ref_probs))

    decided = [i for i, t in enumerate(tests) if t.applicable and t.p_value is not None]
    adjusted = holm_adjust([float(tests[i].p_value or 0.0) for i in decided])
    adjusted_of = dict(zip(decided, adjusted, strict=True))
    tests = [_with_adjusted(t, adjusted_of.get(i)) for i, t in enumerate(tests)]

    enough = n_control >= min_control_probes or any(r.inputs.shape[0] >= min_control_probes for r in replays)
    if not decided:
        return ScanOutcome("inconclusive", 1.0, level, tests, "No test was applicable to the answers.")
    best = min(decided, key=lambda i: adjusted_of[i])
    p_scan = adjusted_of[best]
    learned = sorted(
        {
            r.client_id
            for r in replays
            for i in decided
            if tests[i].name.endswith(f"[client {r.client_id}]") and adjusted_of[i] < level
        }
    )
    summary = f"smallest Holm-adjusted p-value over {len(decided)} tests is {p_scan:.3g} ({tests[best].name})"
    if not enough:
        verdict = "inconclusive"
        explanation = (
            f"Inconclusive: only {n_control} control answers and no replay set of at least "
            f"{min_control_probes} rows; {summary}."
        )
    elif p_scan < level:
        verdict = "stolen"
        explanation = f"Stolen: {summary}, below the level {level:g}. {tests[best].explanation}"
        if learned:
            clients = ", ".join(str(c) for c in learned)
            explanation += f" The suspect has learned the queries of client(s) {clients}."
    else:
        verdict = "not_stolen"
        explanation = f"No evidence of copying: {summary}, not below the level {level:g}."
    return ScanOutcome(verdict, p_scan, level, tests, explanation)
