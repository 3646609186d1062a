"""Payloads that cross a queue or a channel between services (pydantic models).

Rows of numbers (a request's inputs, the probabilities answered) travel as packed float64 bytes in the
msgpack messages of the prediction path: as lists, every value was a Python float built and checked at
each hop (about 1 ms per hop for 80 rows of 80 features, encoding and decoding included); packed, a
hop costs a copy. Dumped as JSON they are nested lists.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgpack
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    WithJsonSchema,
)

ClassLabel = str | int | float | bool


def _rows_from_message(value: Any) -> np.ndarray:
    """A 2-D float64 array from its packed form `{"shape": [rows, columns], "f8": bytes}` (little-endian,
    row-major), from an array, or from nested lists (the form messages of earlier versions carry)."""
    if isinstance(value, dict):
        shape, data = value.get("shape"), value.get("f8")
        if (
            not isinstance(data, bytes)
            or not isinstance(shape, list | tuple)
            or len(shape) != 2
            or not all(type(size) is int and size >= 0 for size in shape)
        ):
            raise ValueError("packed rows need 'shape' [rows, columns] and 'f8' bytes")
        if len(data) != shape[0] * shape[1] * 8:
            raise ValueError(f"packed rows of shape {list(shape)} need {shape[0] * shape[1] * 8} bytes")
        return np.frombuffer(data, dtype="<f8").reshape(shape[0], shape[1])
    if isinstance(value, list) and not value:  # no rows (an error reply of an earlier version)
        return np.zeros((0, 0))
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rows must be numbers: {exc}") from exc
    if array.ndim != 2:
        raise ValueError(f"rows must form a 2-D array; got {array.ndim} dimensions")
    return array


def pack_rows(array: np.ndarray) -> dict[str, Any]:
    """The packed form of a 2-D array, as `Float64Rows` reads it."""
    return {"shape": list(array.shape), "f8": np.ascontiguousarray(array, dtype="<f8").tobytes()}


def _rows_to_message(array: np.ndarray, info: SerializationInfo) -> Any:
    return array.tolist() if info.mode_is_json() else pack_rows(array)


# A 2-D float64 array: packed bytes in Python-mode dumps (msgpack messages), nested lists in JSON.
Float64Rows = Annotated[
    np.ndarray,
    PlainValidator(_rows_from_message),
    PlainSerializer(_rows_to_message),
    WithJsonSchema({"type": "array", "items": {"type": "array", "items": {"type": "number"}}}),
]


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
    instances: Float64Rows
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
    probabilities: Float64Rows = Field(default_factory=lambda: np.zeros((0, 0)))


class PredictReplies(BaseModel):
    """The answers to one job, published together on the gateway's reply channel.

    On the channel they are msgpack with the probabilities packed (`to_message`): as JSON, pydantic
    built and checked a Python float per probability when the worker made the replies and again when
    the gateway read them, 15-20% of both processes' CPU under batch-80 load (py-spy, session 15).
    """

    replies: list[PredictReply]

    def to_message(self) -> bytes:
        return msgpack.packb(self.model_dump())

    @classmethod
    def from_message(cls, data: bytes) -> PredictReplies:
        """Read `to_message`'s bytes, or the JSON replies of workers before session 15 (a JSON
        object starts with "{", a one-key msgpack map with 0x81)."""
        if data[:1] == b"{":
            return cls.model_validate_json(data)
        return cls.model_validate(msgpack.unpackb(data))


class QueryBatch(BaseModel):
    """Every answered row of one request, for the audit queue (one message per request)."""

    request_id: str
    client_id: int
    model: str
    version: int
    scheme: str
    key_id: str
    answered_at: datetime
    inputs: Float64Rows
    probabilities: Float64Rows
    label_indices: list[int]
    labels: list[str]

    def to_message(self) -> dict[str, Any]:
        """The batch for a msgpack message: arrays packed, the time in ISO 8601."""
        message = self.model_dump()
        message["answered_at"] = self.answered_at.isoformat()
        return message

    def shared_fields(self) -> dict[str, Any]:
        """What every row of the request shares, under the stored (and hashed) names."""
        return {
            "request_id": self.request_id,
            "client_id": self.client_id,
            "model_name": self.model,
            "model_version": self.version,
            "scheme": self.scheme,
            "key_id": self.key_id,
            "answered_at": self.answered_at,
        }

    def rows(self) -> list[dict[str, Any]]:
        """The batch as one dict per answered row, in the form `shared.chain.record_hash` takes (arrays
        as float64 little-endian bytes): the per-row reference the packed storage path
        (`services.auditor.service.packed_request`) is checked against."""
        inputs = np.ascontiguousarray(self.inputs, dtype="<f8")
        probabilities = np.ascontiguousarray(self.probabilities, dtype="<f8")
        shared = self.shared_fields()
        return [
            {
                **shared,
                "row_index": index,
                "input": row_input.tobytes(),
                "probabilities": row_probabilities.tobytes(),
                "label_index": label_index,
                "label": label,
            }
            for index, (row_input, row_probabilities, label_index, label) in enumerate(
                zip(inputs, probabilities, self.label_indices, self.labels, strict=True)
            )
        ]
