"""Messages of the prediction path: rows travel packed, and messages of earlier versions still read."""

from __future__ import annotations

from datetime import UTC, datetime

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from shared.schemas import PredictJob, PredictReplies, PredictReply, QueryBatch, pack_rows


def _batch(inputs: object, probabilities: object) -> QueryBatch:
    return QueryBatch(
        request_id="r1",
        client_id=7,
        model="ecg",
        version=2,
        scheme="fast-all-classes",
        key_id="k1",
        answered_at=datetime(2026, 11, 25, 1, 2, 3, 456789, tzinfo=UTC),
        inputs=inputs,
        probabilities=probabilities,
        label_indices=[1, 0],
        labels=["N", "A"],
    )


def test_query_batch_round_trips_through_msgpack_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(2, 5)) * 1e6
    inputs[0, 0] = -0.0
    inputs[1, 4] = np.nextafter(1.0, 2.0)
    probabilities = rng.dirichlet(np.ones(3), size=2)
    sent = _batch(inputs, probabilities)
    wire = msgpack.packb(sent.to_message())
    received = QueryBatch.model_validate(msgpack.unpackb(wire))
    assert received.inputs.tobytes() == inputs.tobytes()
    assert received.probabilities.tobytes() == probabilities.tobytes()
    assert received.answered_at == sent.answered_at
    assert received.rows() == sent.rows()
    # No Python float per value on the wire: the rows are one bytes field.
    assert len(wire) < inputs.nbytes + probabilities.nbytes + 300


def test_replies_round_trip_packed_and_earlier_json_replies_still_read() -> None:
    rng = np.random.default_rng(8)
    probabilities = rng.dirichlet(np.ones(3), size=80)
    probabilities[0, 0] = np.nextafter(0.5, 1.0)
    replies = PredictReplies(
        replies=[
            PredictReply(
                request_id="a",
                ok=True,
                version=2,
                classes=["N", 1, 2.5, True],
                label_indices=np.argmax(probabilities, axis=1).tolist(),
                probabilities=probabilities,
            ),
            PredictReply(request_id="b", ok=False, status=422, error="row 0 has 2 features"),
        ]
    )
    wire = replies.to_message()
    assert len(wire) < probabilities.nbytes + 600  # one bytes field, no float per value
    received = PredictReplies.from_message(wire)
    assert received.replies[0].probabilities.tobytes() == probabilities.tobytes()
    assert received.replies[0].classes == ["N", 1, 2.5, True]
    assert received.replies[1].probabilities.shape == (0, 0)
    assert received.model_dump(exclude={"replies": {0: {"probabilities"}}}) == replies.model_dump(
        exclude={"replies": {0: {"probabilities"}}}
    )
    # A worker of an earlier version published JSON replies, probabilities as lists of floats.
    earlier = replies.model_dump_json().encode()
    assert earlier.startswith(b"{")
    assert PredictReplies.from_message(earlier).replies[0].probabilities.tobytes() == probabilities.tobytes()
    # What the gateway drops as unreadable (it catches ValueError): msgpack's errors are ValueErrors.
    for unreadable in (b"", b"\x81\xa7replies\x05", b"{not json", b"\xc1"):
        with pytest.raises(ValueError):  # noqa: PT011 - any ValueError, as the gateway catches
            PredictReplies.from_message(unreadable)


def test_rows_of_earlier_versions_still_read_and_json_dumps_stay_lists() -> None:
    lists = [[0.25, 1.0, -2.0, 3.5, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0]]
    batch = _batch(lists, [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    assert batch.inputs.dtype == np.float64
    assert batch.inputs.tolist() == lists
    assert batch.model_dump(mode="json")["inputs"] == lists
    assert QueryBatch.model_validate_json(batch.model_dump_json()).inputs.tolist() == lists


def test_predict_job_reads_packed_rows() -> None:
    rows = np.arange(12, dtype=np.float64).reshape(3, 4)
    request = {
        "request_id": "a",
        "client_id": 1,
        "instances": pack_rows(rows),
        "received_at": "2026-11-25T00:00:00Z",
    }
    job = PredictJob.model_validate(
        msgpack.unpackb(
            msgpack.packb({"job_id": "j", "reply_to": "c", "model": "m", "version": 1, "requests": [request]})
        )
    )
    assert np.array_equal(job.requests[0].instances, rows)


@pytest.mark.parametrize(
    ("instances", "fragment"),
    [
        ({"shape": [2, 3], "f8": b"\0" * 47}, "need 48 bytes"),
        ({"shape": [2, 3], "f8": "not bytes"}, "'f8' bytes"),
        ({"shape": [6], "f8": b"\0" * 48}, "'shape' [rows, columns]"),
        ({"shape": [-2, -3], "f8": b"\0" * 48}, "'shape' [rows, columns]"),
        ({"f8": b"\0" * 48}, "'shape' [rows, columns]"),
        ([1.0, 2.0], "2-D"),
        ([[1.0, "x"]], "numbers"),
        ([[1.0], [2.0, 3.0]], "numbers"),
    ],
)
def test_malformed_rows_are_a_validation_error(instances: object, fragment: str) -> None:
    """A validation error (not a crash), so the auditor moves such a message aside."""
    with pytest.raises(ValidationError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        _batch(instances, [[1.0, 0.0, 0.0]] * 2)
