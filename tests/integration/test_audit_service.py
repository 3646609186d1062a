"""Auditor service functions called directly against the real PostgreSQL and Redis of the test stack."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import text

from services.auditor import service
from shared import audit_outbox
from shared.db import session_scope
from shared.names import QUEUE_AUDIT, REDIS_API_KEYS, REDIS_AUDIT_OUTBOX_INDEX, REDIS_MODELS
from shared.schemas import QueryBatch
from tests.conftest import DeployedTestModel, RunningStack

pytestmark = pytest.mark.integration


def _batch(client_id: int, rows: int) -> QueryBatch:
    return QueryBatch(
        request_id=uuid.uuid4().hex,
        client_id=client_id,
        model="small-mlp",
        version=1,
        scheme="hmac-second-class",
        key_id="k1",
        answered_at=datetime.now(UTC),
        inputs=[[float(i)] * 6 for i in range(rows)],
        probabilities=[[0.2, 0.3, 0.5]] * rows,
        label_indices=[2] * rows,
        labels=["mid"] * rows,
    )


def test_storing_a_batch_twice_inserts_it_once(running_stack: RunningStack) -> None:
    client_id, _, _ = running_stack.new_client("idempotent")
    batch = _batch(client_id, rows=7)
    database_url = running_stack.stack.database_url or ""
    with session_scope(database_url) as session:
        assert service.store_query_batch(session, batch).inserted == 7
    with session_scope(database_url) as session:
        assert service.store_query_batch(session, batch).inserted == 0
        assert service.count_queries(session, client_id) == 7


def test_registry_sync_repairs_a_wiped_redis(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, gateway, _ = running_stack.new_client("resync")
    client = redis.Redis.from_url(running_stack.stack.redis_url or "")
    try:
        client.delete(REDIS_API_KEYS, REDIS_MODELS)
        refused = gateway.http.post(f"/v1/models/{small_model.name}/predict", json={"instances": []})
        assert refused.status_code == 401
        with session_scope(running_stack.stack.database_url or "") as session:
            keys, models = service.sync_registry(session, client)
        assert keys >= 1
        assert models >= 1
        with gateway:
            answer = gateway.predict(small_model.name, small_model.X[:1].tolist())
        assert answer["model"] == small_model.name
        with session_scope(running_stack.stack.database_url or "") as session:
            service.set_client_disabled(session, client, client_id, disabled=True)
            keys_after, _ = service.sync_registry(session, client)
        assert keys_after == keys - 1
    finally:
        client.close()


def test_registry_sync_waits_for_a_client_being_created(running_stack: RunningStack) -> None:
    """A sync that starts while a new client is being committed must not wipe the new key from Redis."""
    database_url = running_stack.stack.database_url or ""
    client = redis.Redis.from_url(running_stack.stack.redis_url or "")
    synced = threading.Event()
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            with session_scope(database_url) as session:
                service.sync_registry(session, client)
            synced.set()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    try:
        with session_scope(database_url) as session:
            created = service.create_client(session, f"race-{uuid.uuid4().hex[:8]}")
            syncer = threading.Thread(target=sync)
            syncer.start()
            # The sync must wait for this transaction (it holds the registry lock shared) ...
            assert not synced.wait(timeout=1.0), "the sync did not wait for the client being created"
        # ... and, once the client is committed, see it; it is then published as the API does.
        service.publish_client(client, created.client)
        syncer.join(timeout=30)
        assert not errors, errors
        assert synced.is_set()
        assert client.hexists(REDIS_API_KEYS, created.client.api_key_hash)
    finally:
        client.close()


def test_detector_states_are_stored_without_compression(running_stack: RunningStack) -> None:
    # Migration 0004: float32 archives do not compress, and pglz's attempt cost PostgreSQL CPU per job.
    with session_scope(running_stack.stack.database_url or "") as session:
        storage = session.execute(
            text(
                "SELECT attstorage FROM pg_attribute "
                "WHERE attrelid = 'suspicion_states'::regclass AND attname = 'state'"
            )
        ).scalar_one()
    assert storage == "e"


def test_outbox_resends_only_overdue_entries_and_only_with_an_empty_queue(
    running_stack: RunningStack,
) -> None:
    # A database of its own on the stack's Redis (the workers use database 0).
    client = redis.Redis.from_url((running_stack.stack.redis_url or "").rsplit("/", 1)[0] + "/15")
    try:
        client.flushdb()
        audit_outbox.put(client, "old", {"batches": [], "outbox_id": "old"})
        audit_outbox.put(client, "new", {"batches": [], "outbox_id": "new"})
        client.zadd(REDIS_AUDIT_OUTBOX_INDEX, {"old": 1000.0, "new": 1095.0})
        assert audit_outbox.pending(client) == 2
        client.lpush(QUEUE_AUDIT, b"a message still waiting")
        assert audit_outbox.overdue(client, resend_after=60, now=1100.0) == []  # the queue is not empty
        client.delete(QUEUE_AUDIT)
        assert audit_outbox.overdue(client, resend_after=60, now=1100.0) == [
            ("old", {"batches": [], "outbox_id": "old"})
        ]
        # Its clock restarts: not re-sent again before another `resend_after` seconds.
        assert audit_outbox.overdue(client, resend_after=60, now=1130.0) == []
        audit_outbox.remove(client, "old")
        audit_outbox.remove(client, "new")
        assert audit_outbox.pending(client) == 0
        assert audit_outbox.overdue(client, resend_after=60, now=5000.0) == []
    finally:
        client.flushdb()
        client.close()
