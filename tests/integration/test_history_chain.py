"""The hash-chained query history: verification finds edits, deletions and reordering; exports re-verify."""

from __future__ import annotations

import io
from datetime import datetime

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


def test_edited_row_breaks_the_chain_at_that_row(running_stack: RunningStack, chained_client: int) -> None:
    _sql(
        running_stack,
        # One bit of one stored probability: a change far below any printed precision.
        "UPDATE query_records SET probabilities = set_byte(probabilities, 0, get_byte(probabilities, 0) # 1) "
        "WHERE client_id = :c AND seq = 12",
        c=chained_client,
    )
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 12
    assert "modified" in str(result["reason"])
    assert result["records_checked"] == 11


def test_deleted_rows_are_detected(running_stack: RunningStack, chained_client: int) -> None:
    _sql(running_stack, "DELETE FROM query_records WHERE client_id = :c AND seq = 5", c=chained_client)
    middle = _verify(running_stack, chained_client)
    assert middle["ok"] is False
    assert middle["first_broken_seq"] == 6
    assert "missing" in str(middle["reason"])


def test_truncated_tail_is_detected(running_stack: RunningStack, chained_client: int) -> None:
    _sql(running_stack, "DELETE FROM query_records WHERE client_id = :c AND seq > 19", c=chained_client)
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 20
    assert "deleted" in str(result["reason"])


def test_reordered_rows_are_detected(running_stack: RunningStack, chained_client: int) -> None:
    _sql(
        running_stack,
        "UPDATE query_records SET seq = -3 WHERE client_id = :c AND seq = 3",
        "UPDATE query_records SET seq = 3 WHERE client_id = :c AND seq = 4",
        "UPDATE query_records SET seq = 4 WHERE client_id = :c AND seq = -3",
        c=chained_client,
    )
    result = _verify(running_stack, chained_client)
    assert result["ok"] is False
    assert result["first_broken_seq"] == 3


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
