"""Reference models for experiments: the paper's ECG MLP and a breast-cancer MLP, plus safe persistence.

Models are stored with skops (never pickle) and reference data as plain .npz arrays, so nothing we
write or read can execute code on load.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as sio
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from shared.ecg import generate_ecg
from shared.modelfile import UntrustedModelError, load_model_bytes

__all__ = [
    "UntrustedModelError",
    "fit_quietly",
    "load_model_file",
    "mlp_pipeline",
    "save_model",
    "save_reference_data",
]

# Ample for adam to reach its tolerance-based stop (ECG: ~110 epochs, breast cancer: ~320), so no
# ConvergenceWarning in practice; fit_quietly only guards against other seeds.
MAX_ITER = 1000


@dataclass(frozen=True)
class TrainedModel:
    """A fitted classifier together with the exact data it was trained and evaluated on."""

    name: str
    estimator: Any
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    test_accuracy: float
    description: str


def mlp_pipeline(hidden_layer_sizes: tuple[int, ...], random_state: int) -> Pipeline:
    """Standardise, then an MLP: raw features have very different scales (e.g. breast-cancer areas)."""
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "mlp",
                MLPClassifier(
                    hidden_layer_sizes=hidden_layer_sizes,
                    max_iter=MAX_ITER,
                    random_state=random_state,
                    early_stopping=False,
                ),
            ),
        ]
    )


def _drop_optimizer_state(estimator: Any) -> None:
    """Delete MLP optimizer state in place (in a Pipeline's steps too).

    The fitted MLP keeps its Adam/SGD optimizer only to resume training (partial_fit rebuilds it when
    absent), and skops does not trust that type: files carrying it would be refused by
    load_model_file and by the service's model loader. Predictions do not depend on it.
    """
    steps = [step for _, step in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    for step in steps:
        if isinstance(step, Pipeline):
            _drop_optimizer_state(step)
        elif hasattr(step, "_optimizer"):
            del step._optimizer


def fit_quietly(estimator: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """Fit without ConvergenceWarning noise (a model is what it is), then drop MLP optimizer state."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        estimator.fit(X, y)
    _drop_optimizer_state(estimator)
    return estimator


def train_ecg_model(
    data_seed: int = 42, train_seed: int = 123, n_samples: int = 1200, test_size: float = 0.25
) -> TrainedModel:
    """Train the paper's ECG classifier: MLP (64, 32) on synthetic 4-class ECG windows."""
    X, y = generate_ecg(n_samples=n_samples, seed=data_seed)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, stratify=y, random_state=data_seed
    )
    estimator = fit_quietly(mlp_pipeline((64, 32), train_seed), X_train, y_train)
    accuracy = float(estimator.score(X_test, y_test))
    return TrainedModel(
        name="ecg-mlp",
        estimator=estimator,
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        test_accuracy=accuracy,
        description=(
            f"StandardScaler + MLPClassifier(64, 32) on {n_samples} synthetic ECG windows x "
            f"{X.shape[1]} steps, 4 rhythm classes (data seed {data_seed}, training seed {train_seed}; "
            f"{len(y_test)} windows held out)"
        ),
    )


def train_breast_cancer_model(seed: int = 123, test_size: float = 0.25) -> TrainedModel:
    """Train an MLP (32, 16) on scikit-learn's bundled Wisconsin breast-cancer data."""
    data = load_breast_cancer()
    X = np.asarray(data.data, dtype=np.float64)
    # String labels, so that served predictions read "malignant"/"benign" rather than 0/1.
    y = np.asarray(data.target_names)[data.target]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, stratify=y, random_state=42
    )
    estimator = fit_quietly(mlp_pipeline((32, 16), seed), X_train, y_train)
    accuracy = float(estimator.score(X_test, y_test))
    return TrainedModel(
        name="breast-cancer-mlp",
        estimator=estimator,
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        test_accuracy=accuracy,
        description=(
            f"StandardScaler + MLPClassifier(32, 16) on the Wisconsin breast-cancer data "
            f"({X.shape[0]} samples x {X.shape[1]} features; training seed {seed}; "
            f"{len(y_test)} samples held out)"
        ),
    )


def save_model(estimator: Any, path: Path) -> str:
    """Write ``estimator`` as a skops file and return the SHA-256 hex digest of the file."""
    path = Path(path)
    # Strip a copy, not the caller's estimator, which may still be trained further.
    clean = copy.deepcopy(estimator)
    _drop_optimizer_state(clean)
    sio.dump(clean, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model_file(path_or_bytes: str | Path | bytes | bytearray | memoryview) -> Any:
    """Load a skops model file (path or bytes) with the services' loader: trusted types only, no pickle."""
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        data = bytes(path_or_bytes)
    else:
        data = Path(path_or_bytes).read_bytes()
    return load_model_bytes(data)


def save_reference_data(X: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Write reference features and labels to an .npz that loads with ``allow_pickle=False``."""
    X_arr = np.asarray(X, dtype=np.float64)
    # Object arrays would be pickled inside the .npz; a fixed-width unicode array is not.
    y_arr = np.asarray(y).astype(str)
    if X_arr.ndim != 2 or y_arr.ndim != 1 or X_arr.shape[0] != y_arr.shape[0]:
        raise ValueError(f"expected X (n, d) and y (n,), got {X_arr.shape} and {y_arr.shape}")
    # Through a buffer because np.savez appends ".npz" to paths lacking it; we write exactly ``path``.
    buffer = io.BytesIO()
    np.savez(buffer, X=X_arr, y=y_arr)
    Path(path).write_bytes(buffer.getvalue())
