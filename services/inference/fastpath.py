"""`predict_proba` without scikit-learn's per-call machinery, for the models the stack serves most.

scikit-learn spends most of a small call on checks and dispatch, not arithmetic: for the ECG pipeline
(StandardScaler + MLPClassifier(64, 32)), `predict_proba` of one row took about 300 µs in process, of
which the forward pass is about 15 (input validation, feature-name and dataframe checks, the
pipeline's routing). At 200 single-row requests/s that was an eighth of an inference worker's CPU.

`compile_predict_proba` turns a fitted estimator of a supported shape into a function doing the
same numpy operations in the same order as scikit-learn: `Pipeline` steps of `StandardScaler` (or
"passthrough") ending in `MLPClassifier`, or a bare `MLPClassifier`. Only those exact classes: a
subclass may override what it computes. The function is used only if, on probe rows of several
batch sizes, it returns exactly (bit for bit) what the estimator's own `predict_proba` returns;
otherwise, and for every other estimator, the caller keeps scikit-learn's. So a scikit-learn release
that computes differently costs speed, never a different answer.

The function expects what the inference worker hands it: a C-contiguous float64 array of finite rows
of the model's width (the worker checks them before predicting).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import sklearn
from scipy.special import expit
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

PredictProba = Callable[[np.ndarray], np.ndarray]

# Row counts of the probe batches the compiled function must match scikit-learn on.
PROBE_ROWS = (1, 2, 80, 257)
_PROBE_SEED = 20261207


def _relu(X: np.ndarray) -> None:
    np.maximum(X, 0, out=X)


def _tanh(X: np.ndarray) -> None:
    np.tanh(X, out=X)


def _logistic(X: np.ndarray) -> None:
    expit(X, out=X)


def _identity(X: np.ndarray) -> None:
    pass


def _softmax(X: np.ndarray) -> None:
    shifted = X - X.max(axis=1)[:, np.newaxis]
    np.exp(shifted, out=X)
    X /= X.sum(axis=1)[:, np.newaxis]


# In-place activations, as sklearn.neural_network applies them.
_ACTIVATIONS: dict[str, Callable[[np.ndarray], None]] = {
    "relu": _relu,
    "tanh": _tanh,
    "logistic": _logistic,
    "identity": _identity,
    "softmax": _softmax,
}


def _scaler_step(scaler: StandardScaler) -> Callable[[np.ndarray], np.ndarray]:
    mean = np.asarray(scaler.mean_, dtype=np.float64) if scaler.with_mean else None
    scale = np.asarray(scaler.scale_, dtype=np.float64) if scaler.with_std else None

    def transform(X: np.ndarray) -> np.ndarray:
        out = X - mean if mean is not None else X.copy()
        if scale is not None:
            out /= scale
        return out

    return transform


def _mlp_proba(mlp: MLPClassifier) -> PredictProba | None:
    hidden = _ACTIVATIONS.get(mlp.activation)
    output = _ACTIVATIONS.get(mlp.out_activation_)
    if hidden is None or output is None:
        return None
    weights = [np.asarray(coef) for coef in mlp.coefs_]
    biases = [np.asarray(intercept) for intercept in mlp.intercepts_]
    if any(array.dtype != np.float64 for array in (*weights, *biases)):
        return None
    last = len(weights) - 1
    single_output = mlp.n_outputs_ == 1

    def predict_proba(X: np.ndarray) -> np.ndarray:
        activation = X
        for index, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            activation = activation @ weight
            activation += bias
            if index != last:
                hidden(activation)
        output(activation)
        if single_output:
            positive = activation.ravel()
            return np.vstack([1 - positive, positive]).T
        return activation

    return predict_proba


def _build(estimator: object) -> PredictProba | None:
    if type(estimator) is MLPClassifier:
        return _mlp_proba(estimator)
    if not isinstance(estimator, Pipeline) or type(estimator) is not Pipeline or not estimator.steps:
        return None
    transforms = []
    for _, step in estimator.steps[:-1]:
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        if type(step) is not StandardScaler:
            return None
        transforms.append(_scaler_step(step))
    final = estimator.steps[-1][1]
    if type(final) is not MLPClassifier:
        return None
    model = _mlp_proba(final)
    if model is None:
        return None

    def predict_proba(X: np.ndarray) -> np.ndarray:
        for transform in transforms:
            X = transform(X)
        return model(X)

    return predict_proba


def _probe_rows(estimator: object, n_features: int) -> list[np.ndarray]:
    """Rows around the data the model was fitted on (its scaler's mean and scale, when it has one)."""
    center, spread = np.zeros(n_features), np.ones(n_features)
    if isinstance(estimator, Pipeline) and estimator.steps:
        first = estimator.steps[0][1]
        if type(first) is StandardScaler:
            center = np.asarray(first.mean_ if first.with_mean else center, dtype=np.float64)
            spread = np.asarray(first.scale_ if first.with_std else spread, dtype=np.float64)
    rng = np.random.default_rng(_PROBE_SEED)
    return [
        np.ascontiguousarray(center + spread * rng.normal(size=(rows, n_features))) for rows in PROBE_ROWS
    ]


def sklearn_predict_proba(estimator: object) -> PredictProba:
    """The estimator's own `predict_proba`, without the checks of rows already checked."""

    def predict_proba(X: np.ndarray) -> np.ndarray:
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            return np.asarray(estimator.predict_proba(X), dtype=np.float64)  # type: ignore[attr-defined]

    return predict_proba


def agrees(candidate: PredictProba, reference: PredictProba, probes: list[np.ndarray]) -> bool:
    """Whether `candidate` returns exactly what `reference` does on every probe batch."""
    for rows in probes:
        try:
            got = candidate(rows.copy())
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            logger.exception("the compiled predict_proba failed on probe rows")
            return False
        expected = reference(rows.copy())
        if got.shape != expected.shape or got.dtype != expected.dtype or not np.array_equal(got, expected):
            return False
    return True


def compile_predict_proba(estimator: object, n_features: int) -> PredictProba | None:
    """A faster `predict_proba` equal to the estimator's, or None (unsupported, or not equal)."""
    compiled = _build(estimator)
    if compiled is None:
        return None
    if not agrees(compiled, sklearn_predict_proba(estimator), _probe_rows(estimator, n_features)):
        logger.warning(
            "compiled predict_proba differs from scikit-learn's on probe rows; using scikit-learn's",
            extra={"estimator": type(estimator).__name__, "sklearn": sklearn.__version__},
        )
        return None
    return compiled
