"""Auditor service functions called directly against the real PostgreSQL and Redis of the test stack."""

from __future__ import annotations

import hashlib
import itertools
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
import pytest
import redis
from alembic import command
from sqlalchemy import PrimaryKeyConstraint, UniqueConstraint, create_engine, func, make_url, select, text
from sqlalchemy.orm import Session

from services.auditor import service, suspicion
from shared import audit_outbox
from shared.db import QueryRecord, SuspicionState, get_engine, session_scope
from shared.migrate import alembic_config, upgrade_to_head
from shared.names import (
    REDIS_API_KEYS,
    REDIS_AUDIT_DRAIN_QUEUED,
    REDIS_AUDIT_OUTBOX_INDEX,
    REDIS_AUDIT_OUTBOX_REJECTED,
    REDIS_MODELS,
)
from shared.schemas import QueryBatch
from tests.conftest import DeployedTestModel, RunningStack, side_redis_url, wait_until

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


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def _unanalysed_query_records(
    session: Session, rows: int = 240_000, clients: tuple[int, int] = (1, 2)
) -> None:
    """A temporary query_records, searched before the real one for the rest of the transaction: the
    real one's columns and indexes, `rows` rows and no statistics (autovacuum never analyses temporary
    tables), as a fresh deployment's table is under load until autovacuum's first analysis. Rows come
    80 to a request (request_id = md5 of the request number); even requests belong to the first
    client, which queries models "ecg-a" and "ecg-b" in turn, odd ones to the second and "ecg-c".
    Row i has id i + 1; its seq counts the client's rows from 1."""
    session.execute(
        text("CREATE TEMP TABLE query_records (LIKE public.query_records INCLUDING ALL) ON COMMIT DROP")
    )
    session.execute(
        text(
            "INSERT INTO query_records (id, request_id, row_index, client_id, model_name, model_version,"
            " scheme, key_id, answered_at, input, probabilities, label_index, label, seq, prev_hash,"
            " record_hash) SELECT i + 1, md5((i / 80)::text), i % 80,"
            " CASE WHEN (i / 80) % 2 = 0 THEN :first ELSE :second END,"
            " CASE WHEN (i / 80) % 2 = 1 THEN 'ecg-c' WHEN (i / 160) % 2 = 0 THEN 'ecg-a' ELSE 'ecg-b' END,"
            " 1, 's', 'k', now(), int8send(i), '', 0, 'x', (i / 160) * 80 + i % 80 + 1, '', ''"
            " FROM generate_series(0, :last) AS i"
        ),
        {"last": rows - 1, "first": clients[0], "second": clients[1]},
    )


def _plan_scans(session: Session, sql: str, parameters: dict[str, Any] | tuple[Any, ...]) -> list[str]:
    """The node types of the query's plan, outermost first (EXPLAIN on the session's connection)."""
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", parameters)
        row = cursor.fetchone()
    assert row is not None
    return [node["Node Type"] for node in _plan_nodes(row[0][0]["Plan"])]


def test_redelivery_probe_uses_the_unique_index_on_a_large_unanalysed_table(
    running_stack: RunningStack,
) -> None:
    """The check for already stored requests stays one index probe per request on a table that
    autovacuum has not analysed yet, and finds exactly the stored requests. `request_id IN (...)`,
    the check it replaced, is planned there as a sequential scan of the whole table."""
    with session_scope(running_stack.stack.database_url or "") as session:
        _unanalysed_query_records(session)
        stored_ids = [hashlib.md5(str(i).encode()).hexdigest() for i in (0, 17, 2999)]  # noqa: S324
        probed = stored_ids + [uuid.uuid4().hex for _ in range(27)]
        plan = session.execute(
            text(f"EXPLAIN (FORMAT JSON) {service.STORED_REQUESTS.text}"), {"request_ids": probed}
        ).scalar_one()[0]["Plan"]
        nodes = [node for node in _plan_nodes(plan) if node.get("Relation Name") == "query_records"]
        assert nodes, plan
        assert {node["Node Type"] for node in nodes} <= {"Index Scan", "Index Only Scan"}, plan
        assert service.stored_requests(session, probed) == set(stored_ids)
        session.rollback()


def test_scoring_reads_stop_at_their_limit_on_a_large_unanalysed_table(running_stack: RunningStack) -> None:
    """Scoring lists a client's models and reads a block of one model's new rows by ordered index
    scans, neither reading the rest of the backlog nor sorting it, on a table that autovacuum has not
    analysed yet. (Before the (client_id, model_name, id) index, the block read was planned as a
    bitmap scan of the client's whole backlog and a sort spilled to disk; the model list read every
    new row.)"""
    with session_scope(running_stack.stack.database_url or "") as session:
        _unanalysed_query_records(session)
        models_plan = _plan_scans(session, suspicion._CLIENT_MODELS_SQL, {"client": 1})
        assert "Seq Scan" not in models_plan, models_plan
        assert "Sort" not in models_plan, models_plan
        assert "Bitmap Heap Scan" not in models_plan, models_plan
        assert suspicion._client_models(session, 1) == ["ecg-a", "ecg-b"]
        assert suspicion._client_models(session, 2) == ["ecg-c"]
        assert suspicion._client_models(session, 3) == []

        after, limit = 1000, suspicion.MAX_ROWS_PER_JOB
        rows_plan = _plan_scans(session, suspicion._NEW_ROWS_SQL, (1, "ecg-b", after, limit))
        assert rows_plan == ["Limit", "Index Scan"], rows_plan
        ids, inputs, _ = suspicion._new_rows(session, 1, "ecg-b", after)
        # Client 1's "ecg-b" rows: requests 2, 6, 10, ... (i / 80 = 2 mod 4), ids i + 1.
        expected = [i + 1 for i in range(240_000) if (i // 80) % 4 == 2 and i + 1 > after][:limit]
        assert ids.tolist() == expected
        assert inputs.shape == (limit, 1)
        session.rollback()


def test_scoring_catches_up_on_a_burst_larger_than_one_job_without_new_queries(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """A job scores at most MAX_ROWS_PER_JOB rows per model. The rest of a burst is scored by the
    jobs it queues when its block was full; the beat alone picks only clients whose history grew
    since their last scoring, so a client that went quiet after a burst kept the rest unscored."""
    client_id, _, _ = running_stack.new_client("burst")
    database_url = running_stack.stack.database_url or ""
    rows = 2 * suspicion.MAX_ROWS_PER_JOB + 500
    rng = np.random.default_rng(3)
    with session_scope(database_url) as session:  # one commit: the beat sees one growth
        for start in range(0, rows, 5000):
            count = min(5000, rows - start)
            inputs = small_model.X[rng.integers(0, len(small_model.X), count)]
            inputs = inputs + rng.normal(scale=0.3, size=inputs.shape)
            labels = small_model.estimator.predict(inputs)
            classes = list(small_model.estimator.classes_)
            batch = _batch(client_id, rows=count).model_copy(
                update={
                    "inputs": inputs,
                    "probabilities": small_model.estimator.predict_proba(inputs),
                    "label_indices": [classes.index(label) for label in labels],
                    "labels": [str(label) for label in labels],
                }
            )
            assert service.store_query_batch(session, batch).inserted == count
    with session_scope(database_url) as session:
        newest = session.scalar(select(func.max(QueryRecord.id)).where(QueryRecord.client_id == client_id))

    def scored_up_to() -> list[int]:
        with session_scope(database_url) as session:
            return list(
                session.scalars(
                    select(SuspicionState.last_record_id).where(SuspicionState.client_id == client_id)
                )
            )

    wait_until(
        lambda: len(scored_up_to()) == 3 and min(scored_up_to()) == newest,
        timeout=120,
        message=f"scoring did not reach the burst's last row (id {newest}) without new queries",
        interval=0.5,
    )


def _heap_blocks_read(session: Session) -> int:
    """Blocks of the (temporary) query_records read so far in this transaction."""
    statement = text("SELECT pg_stat_get_xact_blocks_fetched('query_records'::regclass)")
    return int(session.execute(statement).scalar_one())


def test_history_reads_go_in_index_order_on_a_large_unanalysed_table(running_stack: RunningStack) -> None:
    """A page of a client's history after a cursor reads that page, not the rest of the history, and
    the whole chain is streamed in seq order without a sort, on a table autovacuum has not analysed
    yet. (Without `sorts_as_last_resort`, each page was a bitmap scan of all the client's rows after
    the cursor and a sort: 3,677 blocks read here for a page of 100 rows, against 3 with it.)"""
    client_id, _, _ = running_stack.new_client("history-plans")
    other_id, _, _ = running_stack.new_client("history-plans-other")
    with session_scope(running_stack.stack.database_url or "") as session:
        _unanalysed_query_records(session, clients=(client_id, other_id))
        before = _heap_blocks_read(session)
        page = service.list_queries(session, client_id, after_id=1000, limit=100)
        read = _heap_blocks_read(session) - before
        # Client rows are ids 1-80, 161-240, ...: the 100 after id 1000 start at 1121.
        expected = [i + 1 for i in range(240_000) if (i // 80) % 2 == 0 and i + 1 > 1000][:100]
        assert [record.id for record in page] == expected
        assert read < 50, f"{read} blocks read for a page of 100 rows"
        sql = "SELECT * FROM query_records WHERE client_id = %s ORDER BY seq"
        with service.sorts_as_last_resort(session):
            assert "Sort" not in _plan_scans(session, sql, (client_id,))
        assert "Sort" in _plan_scans(session, sql, (client_id,))  # the setting ends with the block
        seqs = [record.seq for record in itertools.islice(service.iter_queries(session, client_id), 500)]
        assert seqs == list(range(1, 501))
        session.rollback()


def test_binary_copy_types_match_the_table_and_store_values_exactly(running_stack: RunningStack) -> None:
    """The binary COPY's declared types are the table's, and awkward text and floats come back as sent."""
    client_id, _, _ = running_stack.new_client("binary-copy")
    database_url = running_stack.stack.database_url or ""
    with session_scope(database_url) as session:
        table = dict(
            session.execute(
                text(
                    "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute"
                    " WHERE attrelid = 'query_records'::regclass AND attnum > 0 AND NOT attisdropped"
                )
            ).all()
        )
    names = {"character varying": "varchar", "integer": "int4", "bigint": "int8", "text": "text"}
    names |= {"timestamp with time zone": "timestamptz", "bytea": "bytea"}
    assert {column: names[table[column]] for column, _ in service.QUERY_RECORD_COLUMN_TYPES} == dict(
        service.QUERY_RECORD_COLUMN_TYPES
    )
    batch = _batch(client_id, rows=3).model_copy(
        update={
            "inputs": [[1e-308, -0.0, 1 / 3, 2.5e300, -7.0, 1.0]] * 3,
            "labels": ["tab\there", "back\\slash\\N", "newline\nand é"],
        }
    )
    with session_scope(database_url) as session:
        assert service.store_query_batch(session, batch).inserted == 3
    with session_scope(database_url) as session:
        stored = session.execute(
            text(
                "SELECT row_index, input, label, answered_at, request_id FROM query_records"
                " WHERE client_id = :client_id ORDER BY row_index"
            ),
            {"client_id": client_id},
        ).all()
    assert [row.label for row in stored] == batch.labels
    assert [np.frombuffer(row.input, dtype="<f8").tolist() for row in stored] == np.asarray(
        batch.inputs
    ).tolist()
    assert {row.answered_at for row in stored} == {batch.answered_at}
    assert {row.request_id for row in stored} == {batch.request_id}


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


def test_query_records_carry_only_the_indexes_in_use(running_stack: RunningStack) -> None:
    # Each index costs PostgreSQL CPU on every stored row; migration 0005 dropped the answer-time one,
    # which no query used, 0006 added the one scoring reads by, and 0007 replaced the per-row unique
    # (request_id, row_index) with one entry per request. The schema the migrations build matches the
    # models' declaration.
    with session_scope(running_stack.stack.database_url or "") as session:
        indexes = set(
            session.execute(
                text("SELECT indexname FROM pg_indexes WHERE tablename = 'query_records'")
            ).scalars()
        )
    table = QueryRecord.__table__
    declared = {index.name for index in table.indexes} | {
        constraint.name
        for constraint in table.constraints
        if isinstance(constraint, (PrimaryKeyConstraint, UniqueConstraint))
    }
    assert (
        indexes
        == declared
        == {
            "pk_query_records",
            "uq_query_records_request_id_first_row",
            "uq_query_records_client_id_seq",
            "ix_query_records_client_id_id",
            "ix_query_records_client_id_model_name_id",
        }
    )


def test_a_request_is_stored_once_even_past_the_redelivery_check(running_stack: RunningStack) -> None:
    """The first-row index (migration 0007) is the backstop behind the redelivery check: a second
    copy of a stored request's rows, linked further down the chain (new seq values), is refused."""
    database_url = running_stack.stack.database_url or ""
    client_id, _, _ = running_stack.new_client("first-row")
    batch = _batch(client_id, rows=3)
    with session_scope(database_url) as session:
        assert service.store_query_batch(session, batch).inserted == 3
    with session_scope(database_url) as session:
        chain = service.lock_chain(session, client_id)
        rows = batch.rows()
        service.link_records(chain.head_hash, chain.length + 1, rows)
        with pytest.raises(psycopg.errors.UniqueViolation, match="uq_query_records_request_id_first_row"):
            service.copy_rows(session, rows)
        session.rollback()
    with session_scope(database_url) as session:
        indexdef = session.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_query_records_request_id_first_row'")
        ).scalar_one()
    assert "UNIQUE" in indexdef, indexdef
    assert "WHERE (row_index = 0)" in indexdef, indexdef


def test_migration_0007_round_trips_on_a_database_with_rows(running_stack: RunningStack) -> None:
    """Downgrading to 0006 turns the first-row index back into the per-row constraint and upgrading
    again restores it, on a scratch database holding stored rows."""
    admin_url = running_stack.stack.database_url or ""
    name = f"migrate_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    scratch_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_to_head(scratch_url)
        with session_scope(scratch_url) as session:
            session.execute(
                text(
                    "INSERT INTO clients (id, name, api_key_hash, api_key_prefix) VALUES (1, 'c', :h, 'mp_')"
                ),
                {"h": "0" * 64},
            )
        with session_scope(scratch_url) as session:
            service.store_query_batch(session, _batch(1, rows=4))

        def indexes() -> set[str]:
            with session_scope(scratch_url) as session:
                return set(
                    session.execute(
                        text("SELECT indexname FROM pg_indexes WHERE tablename = 'query_records'")
                    ).scalars()
                )

        command.downgrade(alembic_config(scratch_url), "0006")
        assert "uq_query_records_request_id_row_index" in indexes()
        assert "uq_query_records_request_id_first_row" not in indexes()
        upgrade_to_head(scratch_url)
        assert "uq_query_records_request_id_first_row" in indexes()
        assert "uq_query_records_request_id_row_index" not in indexes()
        with session_scope(scratch_url) as session:
            assert session.execute(text("SELECT count(*) FROM query_records")).scalar_one() == 4
    finally:
        get_engine(scratch_url).dispose()
        with engine.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        engine.dispose()


@pytest.fixture
def outbox_redis(running_stack: RunningStack) -> Iterator[redis.Redis]:
    """A database of its own on the stack's Redis (the workers use database 0), emptied around the test."""
    client = redis.Redis.from_url(side_redis_url(running_stack))
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def _message(name: str) -> dict[str, Any]:
    return {"batches": [{"request_id": name}]}


def test_outbox_claims_oldest_first_under_a_lease_and_asks_for_one_drain_per_burst(
    outbox_redis: redis.Redis,
) -> None:
    client = outbox_redis
    # The first put of a burst asks for a drain; the others find one queued.
    assert audit_outbox.put(client, "a", _message("a"), now=1000.0)
    assert not audit_outbox.put(client, "b", _message("b"), now=1001.0)
    assert not audit_outbox.put(client, "c", _message("c"), now=1002.0)
    assert audit_outbox.pending(client) == 3
    assert audit_outbox.waiting(client, longer_than=5, now=1006.5) == 2  # a and b
    # A claim takes the oldest. The drain claims again once it has stored them, so the flag stays set
    # (renewed) and a put meanwhile asks for no drain of its own.
    assert audit_outbox.claim(client, limit=2, lease_seconds=30, now=1010.0) == [
        ("a", _message("a")),
        ("b", _message("b")),
    ]
    assert 0 < client.ttl(REDIS_AUDIT_DRAIN_QUEUED) <= audit_outbox.FLAG_TTL_SECONDS
    assert not audit_outbox.put(client, "d", _message("d"), now=1011.0)
    # Claimed entries are not claimed again (by this drain or another) during their lease ...
    assert [i for i, _ in audit_outbox.claim(client, limit=10, lease_seconds=30, now=1012.0)] == ["c", "d"]
    # The claim that finds nothing ends the drain and clears the flag: the next put asks again.
    assert audit_outbox.claim(client, limit=10, lease_seconds=30, now=1020.0) == []
    assert not client.exists(REDIS_AUDIT_DRAIN_QUEUED)
    assert audit_outbox.put(client, "e", _message("e"), now=1020.5)
    assert [i for i, _ in audit_outbox.claim(client, limit=10, lease_seconds=30, now=1020.6)] == ["e"]
    audit_outbox.remove(client, ["e"])
    assert audit_outbox.waiting(client, longer_than=0, now=1020.0) == 0
    # ... unless their drain gives them back (its transaction failed) ...
    audit_outbox.release(client, ["c"], now=1021.0)
    assert [i for i, _ in audit_outbox.claim(client, limit=10, lease_seconds=30, now=1022.0)] == ["c"]
    # ... and committed ones are forgotten; the rest come back once their lease runs out.
    audit_outbox.remove(client, ["a", "b"])
    assert audit_outbox.pending(client) == 2
    assert audit_outbox.claim(client, limit=10, lease_seconds=30, now=1041.0) == []
    assert [i for i, _ in audit_outbox.claim(client, limit=10, lease_seconds=30, now=1060.0)] == ["d", "c"]
    # An index entry without its message (removed meanwhile) is dropped, not returned.
    client.zadd(REDIS_AUDIT_OUTBOX_INDEX, {"ghost": 1000.0})
    assert {i for i, _ in audit_outbox.claim(client, limit=10, lease_seconds=30, now=2000.0)} == {"c", "d"}
    assert audit_outbox.pending(client) == 2
    # A message that cannot be stored is moved aside for an operator.
    audit_outbox.reject(client, "c")
    assert audit_outbox.pending(client) == 1
    assert client.hkeys(REDIS_AUDIT_OUTBOX_REJECTED) == [b"c"]


def test_outbox_put_publishes_the_reply_once_the_message_is_kept(outbox_redis: redis.Redis) -> None:
    channel = f"test-reply-{uuid.uuid4().hex}"
    pubsub = outbox_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    try:
        assert pubsub.get_message(timeout=1.0) is None  # the subscription is in place
        assert audit_outbox.put(outbox_redis, "r", _message("r"), now=1000.0, reply=(channel, b"answers"))
        message = pubsub.get_message(timeout=5.0)
        assert message is not None
        assert message["data"] == b"answers"
        assert audit_outbox.claim(outbox_redis, limit=10, lease_seconds=30, now=1001.0) == [
            ("r", _message("r"))
        ]
        # Without a reply, nothing is published.
        audit_outbox.put(outbox_redis, "s", _message("s"), now=1002.0)
        assert pubsub.get_message(timeout=0.5) is None
    finally:
        pubsub.close()


def test_concurrent_drains_claim_disjoint_messages(outbox_redis: redis.Redis) -> None:
    client = outbox_redis
    for index in range(400):
        audit_outbox.put(client, f"m{index}", _message(str(index)), now=1000.0 + index)
    claims: list[list[str]] = [[], [], [], []]

    def drain(mine: list[str]) -> None:
        own = redis.Redis(connection_pool=client.connection_pool)
        while entries := audit_outbox.claim(own, limit=7, lease_seconds=60, now=2000.0):
            mine.extend(outbox_id for outbox_id, _ in entries)

    threads = [threading.Thread(target=drain, args=(mine,)) for mine in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    every = [outbox_id for mine in claims for outbox_id in mine]
    assert sorted(every) == sorted(f"m{index}" for index in range(400))  # each exactly once
    assert sum(bool(mine) for mine in claims) >= 2  # they did run side by side
