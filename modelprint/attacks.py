"""Query strategies of model-extraction attackers (and of honest clients), for tests and experiments.

Every generator returns the rows a client would send, in the order it would send them, as a float64
array of shape (n, F). Randomness always comes from an explicit ``numpy.random.Generator``, so an
experiment is reproducible from its seeds.

- :func:`natural_queries`: an honest client, fresh rows from the data distribution.
- :func:`uniform_random_queries`: uniform noise over the reference data's per-feature box.
- :func:`perturbation_pair_queries`: natural rows, each followed by slightly perturbed copies (probing
  the decision boundary around real inputs).
- :class:`JacobianAugmentation` / :func:`jacobian_augmentation_queries`: Jacobian-based dataset
  augmentation (JBDA, Papernot et al., "Practical Black-Box Attacks against Machine Learning", 2017),
  which needs the victim's answers between rounds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from shared.ecg import generate_ecg

__all__ = [
    "JacobianAugmentation",
    "Oracle",
    "Sampler",
    "ecg_sampler",
    "jacobian_augmentation_queries",
    "natural_queries",
    "perturbation_pair_queries",
    "uniform_random_queries",
]

# A source of fresh in-distribution rows: sampler(n) -> (n, F) float64, new rows on every call.
Sampler = Callable[[int], np.ndarray]
# The victim as the attacker sees it: rows (n, F) -> predicted labels (n,), of any label type.
Oracle = Callable[[np.ndarray], Any]

# The seed of the reference ECG data (modelprint.training.train_ecg_model); samplers never reuse it.
_REFERENCE_ECG_SEED = 42


def _as_rows(X: np.ndarray, name: str) -> np.ndarray:
    rows = np.asarray(X, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (n, F), got shape {rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return rows


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")


def ecg_sampler(rng: np.random.Generator) -> Sampler:
    """A sampler of fresh synthetic ECG windows: every call generates new windows with a new data seed.

    Seeds are drawn from ``rng`` and never equal the reference data's seed (42), so the rows are new
    patients from the same distribution as the model's data, as an honest client's would be.
    """

    def sample(n: int) -> np.ndarray:
        _check_n(n)
        if n == 0:
            return np.empty((0, 80), dtype=np.float64)
        seed = _REFERENCE_ECG_SEED
        while seed == _REFERENCE_ECG_SEED:
            seed = int(rng.integers(1_000_000, 2**31 - 1))
        # generate_ecg needs at least one window per class; it shuffles, so a prefix is a fair sample.
        X, _ = generate_ecg(n_samples=max(n, 4), seed=seed)
        return X[:n]

    return sample


def natural_queries(sampler: Sampler, n: int) -> np.ndarray:
    """An honest client: ``n`` fresh in-distribution rows from ``sampler`` (which owns its randomness)."""
    _check_n(n)
    rows = np.asarray(sampler(n), dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] != n:
        raise ValueError(f"sampler({n}) returned shape {rows.shape}, expected ({n}, F)")
    return rows


def uniform_random_queries(X_ref: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows drawn uniformly from the box [min, max] of each feature of the reference data.

    The classic "random query" extraction strategy (Tramer et al. 2016): it needs no data at all, only
    the input ranges, and its rows look nothing like real inputs.
    """
    _check_n(n)
    ref = _as_rows(X_ref, "X_ref")
    low, high = ref.min(axis=0), ref.max(axis=0)
    return rng.uniform(low, high, size=(n, ref.shape[1]))


def perturbation_pair_queries(
    X_natural: np.ndarray,
    n: int,
    rng: np.random.Generator,
    scale: float = 0.05,
    copies: int = 1,
    feature_std: np.ndarray | None = None,
) -> np.ndarray:
    """Natural rows, each followed by ``copies`` noisy copies: x, x + e_1, ..., x + e_copies, next x, ...

    The noise e is Gaussian with per-feature standard deviation ``scale * feature_std`` (default: the
    standard deviation of ``X_natural``). Such pairs reveal how the model's answer changes around real
    inputs (local boundary probing). The first ``n`` rows of the sequence are returned; ``X_natural``
    must hold at least ceil(n / (copies + 1)) rows, which are used in order.
    """
    _check_n(n)
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    natural = _as_rows(X_natural, "X_natural")
    group = copies + 1
    n_base = -(-n // group)
    if natural.shape[0] < n_base:
        raise ValueError(
            f"{n} queries with {copies} copies need {n_base} natural rows, got {natural.shape[0]}"
        )
    std = natural.std(axis=0) if feature_std is None else np.asarray(feature_std, dtype=np.float64)
    base = natural[:n_base]
    noise = rng.standard_normal((n_base, copies, natural.shape[1])) * (scale * std)
    groups = np.concatenate([base[:, None, :], base[:, None, :] + noise], axis=1)
    out: np.ndarray = groups.reshape(n_base * group, natural.shape[1])[:n]
    return out


class JacobianAugmentation:
    """Jacobian-based dataset augmentation (JBDA) against a label-only oracle.

    The attacker starts from a few natural seed rows, asks the oracle for their labels and trains a
    substitute (multinomial logistic regression, whose input gradient is analytic). Each round then
    adds, for every row x already queried, the new row ``x + step * feature_scale * sign(grad)``, where
    grad is the gradient with respect to x of the substitute's probability for the label the oracle
    gave x (Papernot et al. 2017, eq. 4). The set doubles every round; the last round is cut to the
    query budget by a random choice of parents. The substitute is retrained on all answers after each
    round.

    Drive it step by step (``batch = next_batch(budget)``, send it, ``observe(batch, labels)``), or let
    :meth:`run` call the oracle itself. ``feature_scale`` defaults to the seeds' per-feature standard
    deviation; pass the reference data's to make ``step`` a fraction of the reference std.
    """

    def __init__(
        self,
        seeds: np.ndarray,
        oracle: Oracle,
        rng: np.random.Generator,
        step: float = 0.1,
        feature_scale: np.ndarray | None = None,
    ) -> None:
        self.seeds = _as_rows(seeds, "seeds")
        if step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        self.oracle = oracle
        self.rng = rng
        self.step = float(step)
        scale = self.seeds.std(axis=0) if feature_scale is None else np.asarray(feature_scale, np.float64)
        # A feature constant in the seeds still gets moved, by the mean scale of the others.
        fallback = float(scale[scale > 0].mean()) if np.any(scale > 0) else 1.0
        self.feature_scale = np.where(scale > 0, scale, fallback)
        self._rows: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.rounds = 0

    @property
    def queries(self) -> np.ndarray:
        """Every row sent so far, in order."""
        if not self._rows:
            return np.empty((0, self.seeds.shape[1]), dtype=np.float64)
        return np.concatenate(self._rows)

    @property
    def labels(self) -> np.ndarray:
        """The oracle's labels for :attr:`queries`."""
        return np.concatenate(self._labels) if self._labels else np.empty(0)

    def next_batch(self, budget: int) -> np.ndarray:
        """The next round's rows (at most ``budget``): the seeds first, then one augmentation round."""
        _check_n(budget)
        if budget == 0:
            return np.empty((0, self.seeds.shape[1]), dtype=np.float64)
        if not self._rows:
            return self.seeds[:budget].copy()
        parents = self.queries
        parent_labels = self.labels
        if parents.shape[0] > budget:
            pick = np.sort(self.rng.choice(parents.shape[0], size=budget, replace=False))
            parents, parent_labels = parents[pick], parent_labels[pick]
        direction = self._gradient_sign(parents, parent_labels)
        out: np.ndarray = parents + self.step * self.feature_scale * direction
        return out

    def observe(self, rows: np.ndarray, labels: Any) -> None:
        """Record the oracle's answers for a batch from :meth:`next_batch`."""
        answers = np.asarray(labels)
        if answers.shape != (rows.shape[0],):
            raise ValueError(f"expected {rows.shape[0]} labels, got shape {answers.shape}")
        self._rows.append(np.asarray(rows, dtype=np.float64))
        self._labels.append(answers)
        self.rounds += 1

    def run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Query the oracle round by round until ``n`` rows were sent; returns (rows, labels) in order."""
        _check_n(n)
        while self.queries.shape[0] < n:
            batch = self.next_batch(n - self.queries.shape[0])
            self.observe(batch, self.oracle(batch))
        return self.queries[:n], self.labels[:n]

    def _gradient_sign(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """sign(d p_label(x) / dx) of a logistic-regression substitute fitted on every answer so far."""
        train_X, train_y = self.queries / self.feature_scale, self.labels
        classes = np.unique(train_y)
        if classes.size < 2:
            # Nothing to learn from a single class: explore in random sign directions instead.
            return self.rng.choice([-1.0, 1.0], size=X.shape)
        substitute = LogisticRegression(max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            substitute.fit(train_X, train_y)
        Z = X / self.feature_scale
        W = substitute.coef_
        if classes.size == 2:
            # Binary: sklearn stores one weight vector w for class 1; the logits are (0, w.x + b).
            W = np.vstack([np.zeros_like(W[0]), W[0]])
        probs = substitute.predict_proba(Z)
        target = np.searchsorted(substitute.classes_, labels)
        # d p_c / dz = p_c * (w_c - sum_k p_k w_k) for softmax over linear logits; dz/dx = 1 / scale > 0,
        # so the sign is the same in raw units.
        p_c = probs[np.arange(Z.shape[0]), target]
        grad = p_c[:, None] * (W[target] - probs @ W)
        sign = np.sign(grad)
        # A zero gradient (saturated probability) still moves: random sign, as a fresh direction.
        zero = sign == 0
        sign[zero] = self.rng.choice([-1.0, 1.0], size=int(zero.sum()))
        return sign


def jacobian_augmentation_queries(
    seeds: np.ndarray,
    oracle: Oracle,
    n: int,
    rng: np.random.Generator,
    step: float = 0.1,
    feature_scale: np.ndarray | None = None,
) -> np.ndarray:
    """The first ``n`` rows a JBDA attacker sends, querying ``oracle`` in rounds.

    See :class:`JacobianAugmentation`; use the class directly to also get the oracle's labels.
    """
    rows, _ = JacobianAugmentation(seeds, oracle, rng, step=step, feature_scale=feature_scale).run(n)
    return rows
