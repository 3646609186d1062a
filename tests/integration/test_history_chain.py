"""The hash-chained query history: verification finds edits, deletions and reordering; exports re-verify."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pytest
from sqlalchemy import text

from shared.chain import GENESIS_HASH, record_hash
from shared.db import session_scope
from tests.conftest import DeployedTestModel, RunningStack, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def chained_client(running_stack: RunningStack, small_model: DeployedTestModel) -> int:
    client_id, gateway, _ = running_stack.new_client("chain")
    with gateway:
        for start in (0, 7, 20):
            gateway.predict(small_model.name, small_model.X[start : start + 7].tolist())
    wait_until(lambda: running_stack.query_count(client_id) >= 21, 20, "21 rows stored")
    return client_id


def _verify(running_stack: RunningStack, client_id: int) -> dict[str, object]:
    with running_stack.operator() as operator:
        response = operator.http.get(f"/v1/clients/{client_id}/history/verify")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _sql(running_stack: RunningStack, *statements: str, **params: object) -> None:
    with session_scope(running_stack.stack.database_url or "") as session:
        for statement in statements:
            session.execute(text(statement), params)


def test_intact_history_verifies(running_stack: RunningStack, chained_client: int) -> None:
    result = _verify(running_stack, chained_client)
    assert result["ok"] is True
    assert result["records_checked"] == result["stored_length"] == 21
    assert result["head_hash"] == result["stored_head_hash"]
    assert result["first_broken_seq"] is None


# The chained client's requests hold records #1-7, #8-14 and #15-21 (rows of 6 inputs, 3 probabilities).
INPUT_BYTES, PROBABILITY_BYTES = 6 * 8, 3 * 8


def _edit_request(
    running_stack: RunningStack, client_id: int, first_seq: int, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Rewrite one stored request's packed columns in place, as someone with write access could."""
    columns = ("n_rows", "inputs", "probabilities", "label_indices", "labels", "record_hashes")
    with session_scope(running_stack.stack.database_url or "") as session:
        row = (
            session.execute(
                text(
                    f"SELECT {', '.join(columns)} FROM query_requests WHERE client_id = :c AND first_seq = :s"
                ),
                {"c": client_id, "s": first_seq},
            )
            .one()
            ._asdict()
        )
        values = {column: row[column] for column in columns}
        for column in ("inputs", "probabilities", "record_hashes"):
            values[column] = bytearray(values[column])
        edit(values)
        values = {column: bytes(v) if isinstance(v, bytearray) else v for column, v in values.items()}
        session.execute(
            text(
                f"UPDATE query_requests SET {', '.join(f'{column} = :{column}' for column in columns)}"
                " WHERE client_id = :c AND first_seq = :s"
            ),
            {**values, "c": client_id, "s": first_seq},
        )


def _rows_of(values: dict[str, Any], column: str, width: int) -> list[bytes]:
    data = values[column]
    return [bytes(data[i : i + width]) for i in range(0, len(data), width)]


def test_edited_row_breaks_the_chain_at_that_row(running_stack: RunningStack, chained_client: int) -> None:
    def flip_a_bit(values: dict[str, Any]) -> None:
        # One bit of one stored probability of record #12 (row 4 of the second request): a change
        # far below any printed precision.
        values["probabilities"][4 * PROBABILITY_BYTES] ^= 1

    _edit_request(running_stack, chained_client, 8, flip_a_bit)
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 12
    assert "modified" in str(result["reason"])
    assert result["records_checked"] == 11


def test_deleted_request_is_detected(running_stack: RunningStack, chained_client: int) -> None:
    _sql(running_stack, "DELETE FROM query_requests WHERE client_id = :c AND first_seq = 8", c=chained_client)
    middle = _verify(running_stack, chained_client)
    assert middle["ok"] is False
    assert middle["first_broken_seq"] == 15
    assert "missing" in str(middle["reason"])
    assert middle["records_checked"] == 7


def test_row_deleted_from_inside_a_request_is_detected(
    running_stack: RunningStack, chained_client: int
) -> None:
    def drop_record_12(values: dict[str, Any]) -> None:
        for column, width in (
            ("inputs", INPUT_BYTES),
            ("probabilities", PROBABILITY_BYTES),
            ("record_hashes", 32),
        ):
            rows = _rows_of(values, column, width)
            values[column] = b"".join(rows[:4] + rows[5:])
        values["label_indices"] = values["label_indices"][:4] + values["label_indices"][5:]
        values["labels"] = values["labels"][:4] + values["labels"][5:]
        values["n_rows"] = 6

    _edit_request(running_stack, chained_client, 8, drop_record_12)
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 12
    assert result["records_checked"] == 11


def test_truncated_tail_is_detected(running_stack: RunningStack, chained_client: int) -> None:
    _sql(
        running_stack, "DELETE FROM query_requests WHERE client_id = :c AND first_seq = 15", c=chained_client
    )
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 15
    assert "deleted" in str(result["reason"])
    assert result["records_checked"] == 14


def test_reordered_rows_are_detected(running_stack: RunningStack, chained_client: int) -> None:
    def swap_records_3_and_4(values: dict[str, Any]) -> None:
        for column, width in (
            ("inputs", INPUT_BYTES),
            ("probabilities", PROBABILITY_BYTES),
            ("record_hashes", 32),
        ):
            rows = _rows_of(values, column, width)
            rows[2], rows[3] = rows[3], rows[2]
            values[column] = b"".join(rows)
        for column in ("label_indices", "labels"):
            values[column][2], values[column][3] = values[column][3], values[column][2]

    _edit_request(running_stack, chained_client, 1, swap_records_3_and_4)
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 3


def test_reordered_requests_are_detected(running_stack: RunningStack, chained_client: int) -> None:
    _sql(
        running_stack,
        "UPDATE query_requests SET first_seq = -1 WHERE client_id = :c AND first_seq = 1",
        "UPDATE query_requests SET first_seq = 1 WHERE client_id = :c AND first_seq = 8",
        "UPDATE query_requests SET first_seq = 8 WHERE client_id = :c AND first_seq = -1",
        c=chained_client,
    )
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 1
    assert result["records_checked"] == 0


def test_exports_reverify_offline(running_stack: RunningStack, chained_client: int) -> None:
    with running_stack.operator() as operator:
        jsonl = operator.http.get(f"/v1/clients/{chained_client}/queries/export", params={"format": "jsonl"})
        npz = operator.http.get(f"/v1/clients/{chained_client}/queries/export", params={"format": "npz"})
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    records = [orjson.loads(line) for line in jsonl.content.splitlines()]
    assert [record["seq"] for record in records] == list(range(1, 22))
    # Anyone holding the export can recompute the chain without modelprint's database.
    previous = GENESIS_HASH
    for record in records:
        record["answered_at"] = datetime.fromisoformat(record["answered_at"])
        assert record["prev_hash"] == previous
        previous = record_hash(previous, record)
        assert previous == record["record_hash"]
    with np.load(io.BytesIO(npz.content), allow_pickle=False) as archive:
        assert archive["inputs"].shape == (21, 6)
        assert archive["probabilities"].shape == (21, 3)
        assert list(archive["record_hash"]) == [record["record_hash"] for record in records]
