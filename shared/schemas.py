"""Payloads that cross a queue or a channel between services (pydantic, JSON-serialisable)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ClassLabel = str | int | float | bool


class DeployedModel(BaseModel):
    """What the gateway needs to validate and route a request for a model's active version."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    n_features: int
    classes: list[ClassLabel]
    sha256: str


class ClientIdentity(BaseModel):
    """The client an API key belongs to."""

    model_config = ConfigDict(frozen=True)

    client_id: int
    name: str


class PredictRequest(BaseModel):
    """One gateway request: a client's rows."""

    request_id: str
    client_id: int
    instances: list[list[float]]
    received_at: datetime


class PredictJob(BaseModel):
    """One task on the inference queue: the requests a gateway coalesced for one model version."""

    job_id: str
    reply_to: str
    model: str
    version: int
    requests: list[PredictRequest] = Field(min_length=1)


class PredictReply(BaseModel):
    """The inference worker's answer to one request."""

    request_id: str
    ok: bool
    status: int = 200
    error: str | None = None
    version: int | None = None
    classes: list[ClassLabel] = Field(default_factory=list)
    label_indices: list[int] = Field(default_factory=list)
    probabilities: list[list[float]] = Field(default_factory=list)


class PredictReplies(BaseModel):
    """The answers to one job, published together on the gateway's reply channel."""

    replies: list[PredictReply]


class QueryBatch(BaseModel):
    """Every answered row of one request, for the audit queue (one message per request)."""

    request_id: str
    client_id: int
    model: str
    version: int
    scheme: str
    key_id: str
    answered_at: datetime
    inputs: list[list[float]]
    probabilities: list[list[float]]
    label_indices: list[int]
    labels: list[str]

    def rows(self) -> list[dict[str, Any]]:
        """The batch as one insertable dict per answered row (arrays as float64 little-endian bytes)."""
        inputs = np.ascontiguousarray(self.inputs, dtype="<f8")
        probabilities = np.ascontiguousarray(self.probabilities, dtype="<f8")
        return [
            {
                "request_id": self.request_id,
                "row_index": index,
                "client_id": self.client_id,
                "model_name": self.model,
                "model_version": self.version,
                "scheme": self.scheme,
                "key_id": self.key_id,
                "answered_at": self.answered_at,
                "input": row_input.tobytes(),
                "probabilities": row_probabilities.tobytes(),
                "label_index": label_index,
                "label": label,
            }
            for index, (row_input, row_probabilities, label_index, label) in enumerate(
                zip(inputs, probabilities, self.label_indices, self.labels, strict=True)
            )
        ]
