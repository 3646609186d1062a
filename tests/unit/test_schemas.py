"""Messages of the prediction path: rows travel packed, and messages of earlier versions still read."""

from __future__ import annotations

from datetime import UTC, datetime

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from shared.schemas import PredictJob, QueryBatch, pack_rows


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
