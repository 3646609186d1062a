"""The hash chain over a client's query history: any edit, deletion or reordering breaks it.

Each stored record carries `record_hash = SHA-256(prev_hash || canonical(record))`, where `prev_hash`
is the previous record's hash in the same client's chain (32 zero bytes for the first). The
canonical form is binary and exact, so anyone can recompute it from a database export:

    b"modelprint.chain.v1\\x00"
    u32 length + UTF-8 JSON of [client_id, seq, request_id, row_index, model, model_version,
                               scheme, key_id, answered_at (UTC ISO-8601, microseconds),
                               label_index, label]   (compact separators)
    u32 count + the input row as float64 little-endian
    u32 count + the returned probabilities as float64 little-endian

(all u32 little-endian). Floats are hashed by their exact bits, so a stored value cannot be
"rounded" without breaking the chain.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

CHAIN_TAG = b"modelprint.chain.v1\x00"
GENESIS_HASH = "0" * 64


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _floats(values: Any) -> bytes:
    # Stored rows are float64 little-endian bytes already; lists and arrays are converted to them.
    data = values if isinstance(values, bytes) else np.ascontiguousarray(values, dtype="<f8").tobytes()
    return struct.pack("<I", len(data) // 8) + data


def canonical_record(record: Mapping[str, Any]) -> bytes:
    """The exact bytes a record's hash covers (besides the previous hash)."""
    header = json.dumps(
        [
            record["client_id"],
            record["seq"],
            record["request_id"],
            record["row_index"],
            record["model_name"],
            record["model_version"],
            record["scheme"],
            record["key_id"],
            _timestamp(record["answered_at"]),
            record["label_index"],
            record["label"],
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    return (
        CHAIN_TAG
        + struct.pack("<I", len(header))
        + header
        + _floats(record["input"])
        + _floats(record["probabilities"])
    )


def record_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """The hash of a record linked after `prev_hash`."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical_record(record)).hexdigest()


_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _encode_int(value: Any) -> str:
    # JSON writes an int as its repr; str() gives the same text without the encoder's overhead.
    return str(value) if type(value) is int else _encode_json(value)


_LENGTH = struct.Struct("<I")


def _shared_header_parts(fields: Mapping[str, Any]) -> tuple[str, str, str]:
    """The JSON header's text around a row's seq and row index, from the fields a request's rows
    share: before the seq, between the seq and the row index, and after the row index up to the
    label index."""
    return (
        f"[{_encode_json(fields['client_id'])},",
        f",{_encode_json(fields['request_id'])},",
        f",{_encode_json(fields['model_name'])},{_encode_json(fields['model_version'])},"
        f"{_encode_json(fields['scheme'])},{_encode_json(fields['key_id'])},"
        f"{_encode_json(_timestamp(fields['answered_at']))},",
    )


def _row_digest(
    prev_digest: bytes,
    parts: tuple[str, str, str],
    seq: int,
    row_index: int,
    label_index: int,
    encoded_label: str,
) -> Any:
    """A row's SHA-256 fed with the previous hash, the tag and its header (`record_hash`'s JSON, from the
    request's shared parts); the caller adds the row's two arrays."""
    header = (
        f"{parts[0]}{seq}{parts[1]}{_encode_int(row_index)}{parts[2]}{_encode_int(label_index)},{encoded_label}]"
    ).encode()
    digest = hashlib.sha256(prev_digest)
    digest.update(CHAIN_TAG)
    digest.update(_LENGTH.pack(len(header)))
    digest.update(header)
    return digest


def link_records(prev_hash: str, first_seq: int, records: list[dict[str, Any]]) -> str:
    """Assign seq, prev_hash and record_hash to records in order; return the new head hash.

    Produces exactly `record_hash` for each record, but formats the JSON fields a request's rows
    share once per request instead of once per row, and feeds the hash its parts without joining
    them (about 4x faster than `record_hash` per row on an 80-row request).
    """
    shared_parts: dict[tuple[Any, ...], tuple[str, str, str]] = {}
    labels: dict[str, str] = {}
    prev_digest = bytes.fromhex(prev_hash)
    for offset, record in enumerate(records):
        seq = first_seq + offset
        record["seq"] = seq
        record["prev_hash"] = prev_hash
        key = (
            record["client_id"],
            record["request_id"],
            record["model_name"],
            record["model_version"],
            record["scheme"],
            record["key_id"],
            record["answered_at"],
        )
        parts = shared_parts.get(key)
        if parts is None:
            parts = shared_parts[key] = _shared_header_parts(record)
        label = record["label"]
        encoded_label = labels.get(label)
        if encoded_label is None:
            encoded_label = labels[label] = _encode_json(label)
        digest = _row_digest(
            prev_digest, parts, seq, record["row_index"], record["label_index"], encoded_label
        )
        for values in (record["input"], record["probabilities"]):
            if isinstance(values, bytes):
                digest.update(_LENGTH.pack(len(values) // 8))
                digest.update(values)
            else:
                digest.update(_floats(values))
        prev_digest = digest.digest()
        prev_hash = record["record_hash"] = prev_digest.hex()
    return prev_hash


def link_request(
    prev_hash: str,
    first_seq: int,
    fields: Mapping[str, Any],
    inputs: bytes,
    probabilities: bytes,
    label_indices: list[int],
    labels: list[str],
) -> bytes:
    """Each row's record hash (32 raw bytes per row, in order) for one packed request.

    Exactly `record_hash` for each row, linked from `prev_hash`: `fields` holds what a request's
    rows share (client_id, request_id, model_name, model_version, scheme, key_id, answered_at), and
    `inputs` and `probabilities` are the rows' float64 little-endian bytes one after another. The
    shared JSON is formatted once and each row's arrays are fed to the hash as slices, without
    building a record per row.
    """
    n_rows = len(label_indices)
    input_width = len(inputs) // n_rows if n_rows else 0
    probability_width = len(probabilities) // n_rows if n_rows else 0
    parts = _shared_header_parts(fields)
    input_length = _LENGTH.pack(input_width // 8)
    probability_length = _LENGTH.pack(probability_width // 8)
    encoded_labels: dict[str, str] = {}
    input_view = memoryview(inputs)
    probability_view = memoryview(probabilities)
    digests = bytearray()
    prev_digest = bytes.fromhex(prev_hash)
    for index in range(n_rows):
        label = labels[index]
        encoded_label = encoded_labels.get(label)
        if encoded_label is None:
            encoded_label = encoded_labels[label] = _encode_json(label)
        digest = _row_digest(
            prev_digest, parts, first_seq + index, index, label_indices[index], encoded_label
        )
        digest.update(input_length)
        digest.update(input_view[index * input_width : (index + 1) * input_width])
        digest.update(probability_length)
        digest.update(probability_view[index * probability_width : (index + 1) * probability_width])
        prev_digest = digest.digest()
        digests += prev_digest
    return bytes(digests)
