"""Model artifacts: load scikit-learn models from skops bytes, never with pickle, and describe them."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

# scikit-learn types skops does not trust by default but which only hold arrays and numbers: the
# optimiser state a fitted MLPClassifier keeps. Reviewed by hand; extend with care.
EXTRA_TRUSTED_TYPES = frozenset(
    {
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    }
)


class ModelFileError(ValueError):
    """The uploaded file is not a usable model; the message says why."""


class UntrustedModelError(ModelFileError):
    """The skops file contains types outside the trusted scikit-learn / numpy set."""


@dataclass(frozen=True)
class ModelInfo:
    """What we need to know about a classifier to serve it."""

    classes: list[Any]
    n_features: int
    estimator_type: str
    sha256: str


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of an artifact: the model's static fingerprint."""
    return hashlib.sha256(data).hexdigest()


def load_model_bytes(data: bytes) -> Any:
    """Load a skops artifact, refusing any type skops does not trust by default."""
    import skops.io as sio

    if not data:
        raise ModelFileError("empty model file")
    try:
        found = set(sio.get_untrusted_types(data=data))
    except Exception as exc:  # skops raises many kinds on malformed input
        raise ModelFileError(f"not a readable skops file ({type(exc).__name__}: {exc})") from exc
    untrusted = found - EXTRA_TRUSTED_TYPES
    if untrusted:
        raise UntrustedModelError(
            "the model file contains types that are not trusted: "
            + ", ".join(sorted(untrusted))
            + "; only scikit-learn/numpy types are accepted (save a plain estimator or pipeline "
            "with skops.io.dump)"
        )
    try:
        return sio.loads(data, trusted=sorted(found & EXTRA_TRUSTED_TYPES))
    except Exception as exc:
        raise ModelFileError(f"the skops file could not be loaded ({type(exc).__name__}: {exc})") from exc


def describe_classifier(estimator: Any, data: bytes) -> ModelInfo:
    """Check the estimator is a fitted probabilistic classifier and describe it."""
    if not hasattr(estimator, "predict_proba"):
        raise ModelFileError(
            f"{type(estimator).__name__} has no predict_proba: modelprint serves classifiers"
        )
    classes = getattr(estimator, "classes_", None)
    n_features = getattr(estimator, "n_features_in_", None)
    if classes is None or n_features is None:
        raise ModelFileError(f"{type(estimator).__name__} is not fitted (no classes_ / n_features_in_)")
    if len(classes) < 2:
        raise ModelFileError("the classifier must know at least two classes")
    # A smoke prediction catches artifacts that load but cannot predict.
    try:
        probe = estimator.predict_proba(np.zeros((1, int(n_features))))
    except Exception as exc:
        raise ModelFileError(f"predict_proba failed on a probe row ({type(exc).__name__}: {exc})") from exc
    if probe.shape != (1, len(classes)):
        raise ModelFileError(f"predict_proba returned shape {probe.shape}, expected (1, {len(classes)})")
    return ModelInfo(
        classes=[_json_label(label) for label in classes],
        n_features=int(n_features),
        estimator_type=f"{type(estimator).__module__}.{type(estimator).__qualname__}",
        sha256=sha256_hex(data),
    )


def _json_label(label: Any) -> Any:
    if isinstance(label, np.generic):
        return label.item()
    return label


def load_reference_data(data: bytes, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz with arrays X (rows x features) and y, without pickle; validate shapes."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if "X" not in archive or "y" not in archive:
                raise ModelFileError("reference data must be an .npz with arrays 'X' and 'y'")
            features = np.asarray(archive["X"], dtype=np.float64)
            labels = np.asarray(archive["y"])
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"reference data is not a readable .npz without pickle ({exc})") from exc
    if features.ndim != 2 or features.shape[1] != n_features:
        raise ModelFileError(f"reference X has shape {features.shape}; expected (rows, {n_features})")
    if labels.shape != (features.shape[0],):
        raise ModelFileError(f"reference y has shape {labels.shape}; expected ({features.shape[0]},)")
    if not np.all(np.isfinite(features)):
        raise ModelFileError("reference X contains NaN or infinite values")
    return features, labels
