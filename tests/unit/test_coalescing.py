"""Coalescing requests changes no answer and no hash: fingerprints per row, chain links per request."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from shared import chain
from shared.fingerprint import SCHEMES, get_scheme
from shared.schemas import QueryBatch

KEY = b"coalescing test key, 32 bytes.."


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_fingerprint_of_a_coalesced_batch_equals_per_request_fingerprints(scheme_name: str) -> None:
    rng = np.random.default_rng(11)
    scheme = get_scheme(scheme_name)
    request_sizes = [1, 80, 3, 1, 17]
    inputs = rng.normal(size=(sum(request_sizes), 12))
    probabilities = rng.dirichlet(np.ones(4), size=inputs.shape[0])
    together = scheme.apply(probabilities, inputs, KEY)
    bounds = np.cumsum([0, *request_sizes])
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        alone = scheme.apply(probabilities[start:end], inputs[start:end], KEY)
        np.testing.assert_array_equal(alone.probabilities, together.probabilities[start:end])
        np.testing.assert_array_equal(alone.perturbation, together.perturbation[start:end])


def _batch(rng: np.random.Generator, request_id: str, labels: list[str], rows: int) -> QueryBatch:
    probabilities = rng.dirichlet(np.ones(len(labels)), size=rows)
    label_indices = probabilities.argmax(axis=1)
    return QueryBatch(
        request_id=request_id,
        client_id=7,
        model='ecg "mlp" \u00e9',
        version=3,
        scheme="hmac-second-class",
        key_id="k\\1",
        answered_at=datetime.now(timezone(timedelta(hours=2))),
        inputs=rng.normal(size=(rows, 5)).tolist(),
        probabilities=probabilities.tolist(),
        label_indices=label_indices.tolist(),
        labels=[labels[index] for index in label_indices],
    )


def test_link_records_gives_exactly_the_documented_record_hashes() -> None:
    rng = np.random.default_rng(5)
    rows = (
        _batch(rng, "r1", ["a\nb", "\u2028x", "\x7f\x01\t", "\u65e5\u672c"], 40).rows()
        + _batch(rng, "r2", ["1", "2"], 1).rows()
        + _batch(rng, "r3", ['"q"', "\\"], 9).rows()
    )
    rows[3]["answered_at"] = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # a second timestamp in one request
    rows[5]["input"] = np.frombuffer(rows[5]["input"], dtype="<f8").tolist()  # hashed as its bytes
    expected = copy.deepcopy(rows)
    prev_hash = chain.GENESIS_HASH
    for offset, record in enumerate(expected):
        record["seq"] = 41 + offset
        record["prev_hash"] = prev_hash
        prev_hash = record["record_hash"] = chain.record_hash(prev_hash, record)
    head = chain.link_records(chain.GENESIS_HASH, 41, rows)
    assert head == prev_hash
    assert [(r["seq"], r["prev_hash"], r["record_hash"]) for r in rows] == [
        (r["seq"], r["prev_hash"], r["record_hash"]) for r in expected
    ]


def test_link_request_gives_exactly_the_documented_record_hashes() -> None:
    """The packed request's hashes are the per-row record hashes, linked in order across requests."""
    rng = np.random.default_rng(6)
    batches = [
        _batch(rng, "r1", ["a\nb", "\u2028x", "\x7f\x01\t", "\u65e5\u672c"], 40),
        _batch(rng, "r2", ["1", "2"], 1),
        _batch(rng, "r3", ['"q"', "\\"], 9),
    ]
    prev_hash = chain.GENESIS_HASH
    expected = []
    for offset, record in enumerate(row for batch in batches for row in batch.rows()):
        record["seq"] = 41 + offset
        prev_hash = chain.record_hash(prev_hash, record)
        expected.append(prev_hash)
    linked = []
    head, seq = chain.GENESIS_HASH, 41
    for batch in batches:
        digests = chain.link_request(
            head,
            seq,
            batch.shared_fields(),
            np.ascontiguousarray(batch.inputs, dtype="<f8").tobytes(),
            np.ascontiguousarray(batch.probabilities, dtype="<f8").tobytes(),
            batch.label_indices,
            batch.labels,
        )
        assert len(digests) == 32 * len(batch.label_indices)
        linked += [digests[i : i + 32].hex() for i in range(0, len(digests), 32)]
        head, seq = linked[-1], seq + len(batch.label_indices)
    assert linked == expected
    # One changed bit of one probability changes that row's hash and every later one.
    batch = batches[2]
    probabilities = bytearray(np.ascontiguousarray(batch.probabilities, dtype="<f8").tobytes())
    probabilities[8 * 2 * 3] ^= 1  # row 3's first probability
    changed = chain.link_request(
        expected[40],
        82,
        batch.shared_fields(),
        np.ascontiguousarray(batch.inputs, dtype="<f8").tobytes(),
        bytes(probabilities),
        batch.label_indices,
        batch.labels,
    )
    changed_hashes = [changed[i : i + 32].hex() for i in range(0, len(changed), 32)]
    assert changed_hashes[:3] == expected[41:44]
    assert all(a != b for a, b in zip(changed_hashes[3:], expected[44:], strict=True))
