"""Inference: load a model version once, predict, fingerprint, and build the reply and audit batch."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select

from services.inference.fastpath import PredictProba, compile_predict_proba, sklearn_predict_proba
from shared.config import Secrets
from shared.db import Model, ModelVersion, session_scope
from shared.fingerprint import FingerprintScheme
from shared.modelfile import load_model_bytes, sha256_hex
from shared.schemas import PredictJob, PredictReply, PredictRequest, QueryBatch

logger = logging.getLogger(__name__)


class ModelUnavailableError(LookupError):
    """The requested model version is not in the database."""


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready to serve."""

    name: str
    version: int
    estimator: Any
    classes: list[Any]
    n_features: int
    sha256: str
    # The estimator's predict_proba for rows already checked: compiled (services/inference/fastpath.py)
    # when the estimator is of a supported kind and the compiled one gives the same answers, else
    # scikit-learn's own.
    predict_proba: PredictProba


class ModelCache:
    """Loads each (name, version) from PostgreSQL once per process and keeps it."""

    def __init__(self, database_url: str, compile_models: bool = True) -> None:
        self.database_url = database_url
        self.compile_models = compile_models
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: int) -> LoadedModel:
        """The loaded model, reading and verifying its artifact on first use."""
        cached = self._models.get((name, version))
        if cached is not None:
            return cached
        with self._lock:
            cached = self._models.get((name, version))
            if cached is None:
                cached = self._load(name, version)
                self._models[(name, version)] = cached
            return cached

    def _load(self, name: str, version: int) -> LoadedModel:
        with session_scope(self.database_url) as session:
            row = session.execute(
                select(ModelVersion)
                .join(Model, Model.id == ModelVersion.model_id)
                .where(Model.name == name, ModelVersion.version == version)
            ).scalar_one_or_none()
            if row is None:
                raise ModelUnavailableError(f"model {name!r} version {version} is not deployed")
            artifact, expected_sha, classes = row.artifact, row.sha256, list(row.classes)
        if sha256_hex(artifact) != expected_sha:
            raise ModelUnavailableError(
                f"model {name!r} version {version}: artifact does not match its SHA-256"
            )
        estimator = load_model_bytes(artifact)
        n_features = int(estimator.n_features_in_)
        compiled = compile_predict_proba(estimator, n_features) if self.compile_models else None
        logger.info(
            "model loaded",
            extra={
                "model": name,
                "version": version,
                "sha256": expected_sha,
                "compiled_predict_proba": compiled is not None,
            },
        )
        return LoadedModel(
            name,
            version,
            estimator,
            classes,
            n_features,
            expected_sha,
            predict_proba=compiled or sklearn_predict_proba(estimator),
        )


@dataclass(frozen=True)
class Prediction:
    """Fingerprinted answers for a batch, plus what the audit trail needs."""

    label_indices: np.ndarray
    probabilities: np.ndarray
    perturbation: np.ndarray


def predict_fingerprinted(
    model: LoadedModel, inputs: np.ndarray, scheme: FingerprintScheme, key: bytes
) -> Prediction:
    """Clean probabilities, their top-1 labels, and the fingerprinted probabilities (same labels).

    `inputs` are finite float64 rows of the model's width (`run_predict_job` checks them), so the
    model's predict_proba skips scikit-learn's checks of them (`LoadedModel.predict_proba`).
    """
    clean = model.predict_proba(np.ascontiguousarray(inputs, dtype=np.float64))
    label_indices = np.argmax(clean, axis=1)
    result = scheme.apply(clean, inputs, key)
    return Prediction(label_indices, result.probabilities, result.perturbation)


def _error(request_id: str, status: int, message: str) -> PredictReply:
    return PredictReply(request_id=request_id, ok=False, status=status, error=message)


def run_predict_job(
    job: PredictJob, cache: ModelCache, scheme: FingerprintScheme, secrets: Secrets
) -> tuple[list[PredictReply], list[QueryBatch]]:
    """Answer every request of a job (one reply each, in order) and the audit batches of those answered.

    The rows of all valid requests go through the model and the fingerprint as one array; each
    row's answer depends on that row alone, so coalescing changes no answer.
    """
    try:
        model = cache.get(job.model, job.version)
    except ModelUnavailableError as exc:
        return [_error(request.request_id, 404, str(exc)) for request in job.requests], []
    replies: dict[str, PredictReply] = {}
    valid: list[tuple[PredictRequest, np.ndarray]] = []
    for request in job.requests:
        inputs = request.instances
        rows, features = inputs.shape
        if rows == 0 or features != model.n_features or not np.all(np.isfinite(inputs)):
            message = (
                f"expected 1 or more finite rows of {model.n_features} features, got shape {inputs.shape}"
            )
            replies[request.request_id] = _error(request.request_id, 422, message)
        else:
            valid.append((request, inputs))
    batches: list[QueryBatch] = []
    if valid:
        stacked = valid[0][1] if len(valid) == 1 else np.vstack([inputs for _, inputs in valid])
        prediction = predict_fingerprinted(model, stacked, scheme, secrets.active_key)
        label_indices = prediction.label_indices.tolist()
        labels = [str(label) for label in model.classes]
        answered_at = datetime.now(UTC)
        start = 0
        for request, inputs in valid:
            end = start + inputs.shape[0]
            request_labels = label_indices[start:end]
            replies[request.request_id] = PredictReply(
                request_id=request.request_id,
                ok=True,
                version=model.version,
                classes=model.classes,
                label_indices=request_labels,
                probabilities=prediction.probabilities[start:end],
            )
            batches.append(
                QueryBatch(
                    request_id=request.request_id,
                    client_id=request.client_id,
                    model=model.name,
                    version=model.version,
                    scheme=scheme.name,
                    key_id=secrets.active_key_id,
                    answered_at=answered_at,
                    inputs=inputs,
                    probabilities=prediction.probabilities[start:end],
                    label_indices=request_labels,
                    labels=[labels[index] for index in request_labels],
                )
            )
            start = end
    return [replies[request.request_id] for request in job.requests], batches
