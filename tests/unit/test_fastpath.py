"""The compiled predict_proba of the inference worker against scikit-learn's own (bit for bit)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from modelprint.training import TrainedModel, train_ecg_model
from services.inference import fastpath
from services.inference.service import LoadedModel, predict_fingerprinted
from shared.fingerprint import get_scheme

FEATURES = 12
BATCHES = (1, 3, 80, 500)


def _data(classes: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(loc=3.0, scale=2.0, size=(300, FEATURES))
    y = (X[:, 0] + X[:, 1] > 6.0).astype(int) if classes == 2 else rng.integers(0, classes, size=300)
    return X, y


def _fit(estimator: Any, classes: int) -> Any:
    X, y = _data(classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y)


def _mlp(activation: str = "relu") -> MLPClassifier:
    return MLPClassifier(hidden_layer_sizes=(16, 8), activation=activation, max_iter=30, random_state=3)


def _assert_equal_to_sklearn(estimator: Any, compiled: fastpath.PredictProba) -> None:
    rng = np.random.default_rng(11)
    for rows in BATCHES:
        X = np.ascontiguousarray(rng.normal(loc=3.0, scale=2.5, size=(rows, FEATURES)))
        expected = estimator.predict_proba(X)
        got = compiled(X.copy())
        assert got.shape == expected.shape == (rows, len(estimator.classes_))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
@pytest.mark.parametrize("classes", [2, 4])
def test_pipelines_of_a_scaler_and_an_mlp_compile_to_the_same_answers(activation: str, classes: int) -> None:
    estimator = _fit(Pipeline([("scale", StandardScaler()), ("mlp", _mlp(activation))]), classes)
    compiled = fastpath.compile_predict_proba(estimator, FEATURES)
    assert compiled is not None
    _assert_equal_to_sklearn(estimator, compiled)


@pytest.mark.parametrize(
    "estimator",
    [
        _mlp(),
        Pipeline([("scale", StandardScaler(with_mean=False)), ("mlp", _mlp())]),
        Pipeline([("scale", StandardScaler(with_std=False)), ("mlp", _mlp())]),
        Pipeline([("skip", "passthrough"), ("scale", StandardScaler()), ("mlp", _mlp())]),
        Pipeline([("a", StandardScaler()), ("b", StandardScaler()), ("mlp", _mlp())]),
    ],
    ids=["bare-mlp", "scaler-without-mean", "scaler-without-std", "passthrough", "two-scalers"],
)
def test_other_supported_shapes_compile_to_the_same_answers(estimator: Any) -> None:
    estimator = _fit(estimator, 3)
    compiled = fastpath.compile_predict_proba(estimator, FEATURES)
    assert compiled is not None
    _assert_equal_to_sklearn(estimator, compiled)


class _CustomMLP(MLPClassifier):
    """A subclass may compute something else: it keeps scikit-learn's path."""


@pytest.mark.parametrize(
    "estimator",
    [
        LogisticRegression(max_iter=200),
        Pipeline([("scale", StandardScaler()), ("model", LogisticRegression(max_iter=200))]),
        Pipeline([("scale", MinMaxScaler()), ("mlp", _mlp())]),
        _CustomMLP(hidden_layer_sizes=(4,), max_iter=30, random_state=3),
    ],
    ids=["logistic-regression", "scaler-and-logistic-regression", "minmax-scaler", "mlp-subclass"],
)
def test_other_estimators_keep_scikit_learns_predict_proba(estimator: Any) -> None:
    assert fastpath.compile_predict_proba(_fit(estimator, 3), FEATURES) is None


def test_a_compiled_function_that_differs_by_one_ulp_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    estimator = _fit(Pipeline([("scale", StandardScaler()), ("mlp", _mlp())]), 3)
    exact = fastpath._build(estimator)
    assert exact is not None

    def off_by_one_ulp(X: np.ndarray) -> np.ndarray:
        out = exact(X)
        out[-1, 0] = np.nextafter(out[-1, 0], 2.0)
        return out

    monkeypatch.setattr(fastpath, "_build", lambda _: off_by_one_ulp)
    with caplog.at_level(logging.WARNING, logger=fastpath.__name__):
        assert fastpath.compile_predict_proba(estimator, FEATURES) is None
    assert "differs from scikit-learn" in caplog.text

    def failing(X: np.ndarray) -> np.ndarray:
        raise ValueError("shapes not aligned")

    monkeypatch.setattr(fastpath, "_build", lambda _: failing)
    assert fastpath.compile_predict_proba(estimator, FEATURES) is None


@pytest.fixture(scope="module")
def ecg() -> TrainedModel:
    return train_ecg_model()


def test_the_ecg_model_is_compiled_and_fingerprinted_answers_do_not_change(ecg: TrainedModel) -> None:
    estimator = ecg.estimator
    n_features = int(estimator.n_features_in_)
    compiled = fastpath.compile_predict_proba(estimator, n_features)
    assert compiled is not None
    X = np.ascontiguousarray(ecg.X_test)
    np.testing.assert_array_equal(compiled(X), estimator.predict_proba(X))

    def loaded(predict_proba: fastpath.PredictProba) -> LoadedModel:
        classes = list(estimator.classes_)
        return LoadedModel("ecg", 1, estimator, classes, n_features, "0" * 64, predict_proba)

    scheme, key = get_scheme("hmac-all-classes", 0.05), b"k" * 32
    for rows in (X[:1], X[:80], X):
        fast = predict_fingerprinted(loaded(compiled), rows, scheme, key)
        slow = predict_fingerprinted(loaded(fastpath.sklearn_predict_proba(estimator)), rows, scheme, key)
        np.testing.assert_array_equal(fast.probabilities, slow.probabilities)
        np.testing.assert_array_equal(fast.label_indices, slow.label_indices)
