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
from sqlalchemy import PrimaryKeyConstraint, UniqueConstraint, create_engine, make_url, select, text
from sqlalchemy.orm import Session

from services.auditor import scans, service, suspicion
from shared import audit_outbox
from shared.chain import GENESIS_HASH, link_records
from shared.db import QueryRequest, Suspect, SuspicionState, get_engine, session_scope
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


def _unanalysed_query_requests(
    session: Session, requests: int = 3000, clients: tuple[int, int] = (1, 2)
) -> None:
    """A temporary query_requests, searched before the real one for the rest of the transaction: the
    real one's columns and indexes, `requests` requests of 80 one-feature rows (240,000 rows by
    default) and no statistics (autovacuum never analyses temporary tables), as a fresh deployment's
    table is under load until autovacuum's first analysis. Request r has request_id md5(r); even
    requests belong to the first client, which queries models "ecg-a" and "ecg-b" in turn, odd ones
    to the second and "ecg-c". A client's rows are numbered (seq) from 1 in request order, and row j
    of request r has input r * 80 + j (see `_as_stored`)."""
    session.execute(
        text("CREATE TEMP TABLE query_requests (LIKE public.query_requests INCLUDING ALL) ON COMMIT DROP")
    )
    session.execute(
        text(
            "INSERT INTO query_requests (request_id, client_id, model_name, model_version, scheme, key_id,"
            " answered_at, first_seq, n_rows, inputs, probabilities, label_indices, labels, prev_hash,"
            " record_hashes) SELECT md5(r::text),"
            " CASE WHEN r % 2 = 0 THEN :first ELSE :second END,"
            " CASE WHEN r % 2 = 1 THEN 'ecg-c' WHEN (r / 2) % 2 = 0 THEN 'ecg-a' ELSE 'ecg-b' END,"
            " 1, 's', 'k', now(), (r / 2) * 80 + 1, 80,"
            " (SELECT string_agg(float8send((r * 80 + j)::float8), ''::bytea ORDER BY j)"
            "  FROM generate_series(0, 79) AS j),"
            " '\\x00'::bytea, array_fill(0, ARRAY[80]), array_fill('x'::text, ARRAY[80]), '',"
            " decode(repeat('00', 32 * 80), 'hex')"
            " FROM generate_series(0, :last) AS r"
        ),
        {"last": requests - 1, "first": clients[0], "second": clients[1]},
    )


def _as_stored(values: list[int]) -> list[float]:
    """The inputs `_unanalysed_query_requests` wrote for these values, read as the auditor reads them
    (float8send writes big-endian bytes; the auditor stores and reads little-endian)."""
    return np.frombuffer(np.array(values, dtype=">f8").tobytes(), dtype="<f8").tolist()


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
    autovacuum has not analysed yet, and finds exactly the stored requests. (`request_id IN (...)`,
    an earlier form of the check, was planned there as a sequential scan of the whole table.)"""
    with session_scope(running_stack.stack.database_url or "") as session:
        _unanalysed_query_requests(session)
        stored_ids = [hashlib.md5(str(i).encode()).hexdigest() for i in (0, 17, 2999)]  # noqa: S324
        probed = stored_ids + [uuid.uuid4().hex for _ in range(27)]
        plan = session.execute(
            text(f"EXPLAIN (FORMAT JSON) {service.STORED_REQUESTS.text}"), {"request_ids": probed}
        ).scalar_one()[0]["Plan"]
        nodes = [node for node in _plan_nodes(plan) if node.get("Relation Name") == "query_requests"]
        assert nodes, plan
        assert {node["Node Type"] for node in nodes} <= {"Index Scan", "Index Only Scan"}, plan
        assert service.stored_requests(session, probed) == set(stored_ids)
        session.rollback()


def test_scoring_reads_stop_at_their_limit_on_a_large_unanalysed_table(running_stack: RunningStack) -> None:
    """Scoring lists a client's models and reads a block of one model's new rows by ordered index
    scans, neither reading the rest of the backlog nor sorting it, on a table that autovacuum has not
    analysed yet, and starts exactly after its cursor, inside a request. (Before the
    (client_id, model_name, ...) index, the block read was planned as a bitmap scan of the client's
    whole backlog and a sort spilled to disk; the model list read every new row.)"""
    with session_scope(running_stack.stack.database_url or "") as session:
        _unanalysed_query_requests(session)
        models_plan = _plan_scans(session, suspicion._CLIENT_MODELS_SQL, {"client": 1})
        assert "Seq Scan" not in models_plan, models_plan
        assert "Sort" not in models_plan, models_plan
        assert "Bitmap Heap Scan" not in models_plan, models_plan
        assert suspicion._client_models(session, 1) == ["ecg-a", "ecg-b"]
        assert suspicion._client_models(session, 2) == ["ecg-c"]
        assert suspicion._client_models(session, 3) == []

        after, limit = 1000, suspicion.MAX_ROWS_PER_JOB
        rows_plan = _plan_scans(
            session, suspicion._NEW_ROWS_SQL, {"client": 1, "model": "ecg-b", "after": after}
        )
        assert not {"Seq Scan", "Sort", "Bitmap Heap Scan"} & set(rows_plan), rows_plan
        blocks_before = _heap_blocks_read(session)
        seqs, inputs, _ = suspicion._new_rows(session, 1, "ecg-b", after)
        blocks_read = _heap_blocks_read(session) - blocks_before
        # Client 1's requests r = 0, 2, 4, ... hold its rows (r / 2) * 80 + 1 to + 80; its "ecg-b"
        # requests are r = 2, 6, 10, ...: rows 81-160, 241-320, ...; row 1000 is in r = 24 (ecg-b).
        expected = [
            (seq, r * 80 + (seq - ((r // 2) * 80 + 1)))
            for r in range(2, 3000, 4)
            for seq in range((r // 2) * 80 + 1, (r // 2) * 80 + 81)
            if seq > after
        ][:limit]
        assert seqs.tolist() == [seq for seq, _ in expected]
        assert inputs[:, 0].tolist() == _as_stored([value for _, value in expected])
        # 250 requests of this model give the job's 20,000 rows (a heap fetch each, 257 measured, with
        # the cursor's read-ahead); the model's 750 requests are not all read.
        assert blocks_read < 400, f"{blocks_read} blocks read for a job of {limit} rows"
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
        newest = service.count_queries(session, client_id)

    def scored_up_to() -> list[int]:
        with session_scope(database_url) as session:
            return list(
                session.scalars(select(SuspicionState.last_seq).where(SuspicionState.client_id == client_id))
            )

    wait_until(
        lambda: len(scored_up_to()) == 3 and min(scored_up_to()) == newest,
        timeout=120,
        message=f"scoring did not reach the burst's last row (#{newest}) without new queries",
        interval=0.5,
    )


def _heap_blocks_read(session: Session) -> int:
    """Blocks of the (temporary) query_requests read so far in this transaction (its TOAST table
    apart)."""
    statement = text("SELECT pg_stat_get_xact_blocks_fetched('query_requests'::regclass)")
    return int(session.execute(statement).scalar_one())


def test_history_reads_go_in_index_order_on_a_large_unanalysed_table(running_stack: RunningStack) -> None:
    """A page of a client's history after a cursor reads that page, not the rest of the history, and
    the whole chain is streamed in seq order without a sort, on a table autovacuum has not analysed
    yet. (Without `sorts_as_last_resort`, each page of the per-row table before migration 0008 was a
    bitmap scan of all the client's rows after the cursor and a sort: 3,677 blocks read for a page
    of 100 rows, against 3 with it.)"""
    client_id, _, _ = running_stack.new_client("history-plans")
    other_id, _, _ = running_stack.new_client("history-plans-other")
    with session_scope(running_stack.stack.database_url or "") as session:
        _unanalysed_query_requests(session, clients=(client_id, other_id))
        before = _heap_blocks_read(session)
        page = service.list_queries(session, client_id, after_seq=1000, limit=100)
        read = _heap_blocks_read(session) - before
        # The client's rows 1001-1100: row 1000 is row 39 of its 13th request (r = 24).
        assert [record.seq for record in page] == list(range(1001, 1101))
        assert [record.row_index for record in page[:2]] == [40, 41]
        assert [np.frombuffer(record.input, dtype="<f8")[0] for record in page[:2]] == _as_stored(
            [24 * 80 + 40, 24 * 80 + 41]
        )
        assert read < 50, f"{read} blocks read for a page of 100 rows"
        sql = "SELECT * FROM query_requests WHERE client_id = %s ORDER BY first_seq"
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
                    " WHERE attrelid = 'query_requests'::regclass AND attnum > 0 AND NOT attisdropped"
                )
            ).all()
        )
    names = {"character varying": "varchar", "integer": "int4", "bigint": "int8", "text": "text"}
    names |= {"timestamp with time zone": "timestamptz", "bytea": "bytea"}
    names |= {"integer[]": "int4[]", "text[]": "text[]"}
    assert {column: names[table[column]] for column, _ in service.QUERY_REQUEST_COLUMN_TYPES} == dict(
        service.QUERY_REQUEST_COLUMN_TYPES
    )
    batch = _batch(client_id, rows=3).model_copy(
        update={
            "inputs": [[1e-308, -0.0, 1 / 3, 2.5e300, -7.0, 1.0]] * 3,
            "labels": ["tab\there", "back\\slash\\N", "newline\nand é"],
            "label_indices": [0, 2, 1],
        }
    )
    with session_scope(database_url) as session:
        assert service.store_query_batch(session, batch).inserted == 3
    with session_scope(database_url) as session:
        stored = list(service.iter_queries(session, client_id))
    assert [row.label for row in stored] == batch.labels
    assert [row.label_index for row in stored] == [0, 2, 1]
    assert [row.row_index for row in stored] == [0, 1, 2]
    assert [np.frombuffer(row.input, dtype="<f8").tolist() for row in stored] == np.asarray(
        batch.inputs
    ).tolist()
    assert [np.frombuffer(row.probabilities, dtype="<f8").tolist() for row in stored] == np.asarray(
        batch.probabilities
    ).tolist()
    assert {row.answered_at for row in stored} == {batch.answered_at}
    assert {row.request_id for row in stored} == {batch.request_id}


def test_scan_replay_samples_single_rows_of_the_marked_requests(running_stack: RunningStack) -> None:
    """A scan's replay sample is drawn row by row from the client's requests answered under the
    scheme and key, reproducibly per seed, up to its limit; the model's clients are ranked by rows."""
    client_id, _, _ = running_stack.new_client("replay-sample")
    small_id, _, _ = running_stack.new_client("replay-sample-small")
    database_url = running_stack.stack.database_url or ""
    model = f"replay-{uuid.uuid4().hex[:8]}"  # this test's clients are the model's only ones
    marked = [
        _batch(client_id, rows=rows).model_copy(
            update={"model": model, "inputs": [[float(1000 * n + i)] * 6 for i in range(rows)]}
        )
        for n, rows in enumerate((30, 1, 25))
    ]
    other_key = _batch(client_id, rows=40).model_copy(
        update={"model": model, "key_id": "k2", "inputs": [[-1.0 - i] * 6 for i in range(40)]}
    )
    below_minimum = _batch(small_id, rows=scans.MIN_REPLAY_ROWS - 1).model_copy(update={"model": model})
    with session_scope(database_url) as session:
        service.store_query_batches(session, [*marked, other_key, below_minimum])
    stored = {1000 * n + i for n, rows in enumerate((30, 1, 25)) for i in range(rows)}
    with session_scope(database_url) as session:
        first = scans._sample_rows(session, client_id, model, 20, ("hmac-second-class", "k1"), seed=1)
        again = scans._sample_rows(session, client_id, model, 20, ("hmac-second-class", "k1"), seed=1)
        other = scans._sample_rows(session, client_id, model, 20, ("hmac-second-class", "k1"), seed=2)
        everything = scans._sample_rows(session, client_id, model, 1000, ("hmac-second-class", "k1"), seed=1)
        suspect = Suspect(
            name="s", url="http://127.0.0.1:9/", protocol="v2", model_name=model, remote_model="m"
        )
        candidates = dict(scans._replay_candidates(session, suspect, 500))
    assert first.shape == (20, 6)
    np.testing.assert_array_equal(first, again)
    assert first[:, 0].tolist() != other[:, 0].tolist()
    assert set(first[:, 0].tolist()) <= stored
    assert len({int(value) // 1000 for value in first[:, 0]}) > 1  # rows from several requests
    assert sorted(everything[:, 0].tolist()) == sorted(stored)
    assert (everything == everything[:, :1]).all()  # each row whole, not bytes of two rows
    # 96 rows (of both keys) reach MIN_REPLAY_ROWS; the other client's 49 do not.
    assert candidates == {client_id: scans.ROWS_PER_CLIENT_WITHOUT_SUSPECT}


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


def test_query_requests_carry_only_the_indexes_in_use(running_stack: RunningStack) -> None:
    # Each index costs PostgreSQL CPU on every stored request (migrations 0005-0008). The schema the
    # migrations build matches the models' declaration, and the packed columns are stored
    # uncompressed (float bits and hashes do not compress; pglz's attempt would cost CPU per insert).
    with session_scope(running_stack.stack.database_url or "") as session:
        indexes = set(
            session.execute(
                text("SELECT indexname FROM pg_indexes WHERE tablename = 'query_requests'")
            ).scalars()
        )
        storage = dict(
            session.execute(
                text(
                    "SELECT attname, attstorage FROM pg_attribute WHERE attrelid = 'query_requests'::regclass"
                    " AND attname IN ('inputs', 'probabilities', 'record_hashes')"
                )
            ).all()
        )
        old_table = session.execute(text("SELECT to_regclass('query_records')")).scalar_one()
    table = QueryRequest.__table__
    declared = {index.name for index in table.indexes} | {
        constraint.name
        for constraint in table.constraints
        if isinstance(constraint, (PrimaryKeyConstraint, UniqueConstraint))
    }
    assert (
        indexes
        == declared
        == {
            "pk_query_requests",
            "uq_query_requests_request_id",
            "uq_query_requests_client_id_first_seq",
            "ix_query_requests_client_id_model_name_first_seq",
        }
    )
    assert storage == {"inputs": "e", "probabilities": "e", "record_hashes": "e"}
    assert old_table is None


def test_a_request_is_stored_once_even_past_the_redelivery_check(running_stack: RunningStack) -> None:
    """The unique index on request_id is the backstop behind the redelivery check: a second copy of
    a stored request, linked further down the chain (new seq values), is refused."""
    database_url = running_stack.stack.database_url or ""
    client_id, _, _ = running_stack.new_client("stored-once")
    batch = _batch(client_id, rows=3)
    with session_scope(database_url) as session:
        assert service.store_query_batch(session, batch).inserted == 3
    with session_scope(database_url) as session:
        chain = service.lock_chain(session, client_id)
        request = service.packed_request(batch, chain.length + 1, chain.head_hash)
        with pytest.raises(psycopg.errors.UniqueViolation, match="uq_query_requests_request_id"):
            service.copy_requests(session, [request])
        session.rollback()


def test_a_request_repeated_within_one_drain_is_stored_once(running_stack: RunningStack) -> None:
    """The same request twice in one transaction (a redelivery drained with the original) is stored
    once, and the chain stays whole."""
    database_url = running_stack.stack.database_url or ""
    client_id, _, _ = running_stack.new_client("twice-in-a-drain")
    first, second = _batch(client_id, rows=4), _batch(client_id, rows=2)
    with session_scope(database_url) as session:
        stored = service.store_query_batches(session, [first, second, first])
    assert stored[client_id].inserted == 6
    with session_scope(database_url) as session:
        verification = service.verify_chain(session, client_id)
    assert verification.ok, verification
    assert verification.records_checked == 6


def _scratch_database(admin_url: str) -> tuple[str, Any]:
    name = f"migrate_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), engine


def test_migration_0008_packs_stored_rows_into_requests_and_back(running_stack: RunningStack) -> None:
    """Upgrading from 0007 moves each request's rows into one stored request, keeping every row's
    place in the chain (which still verifies) and turning the detectors' cursors from row ids into
    seqs; downgrading unpacks them into the same rows again."""
    scratch_url, engine = _scratch_database(running_stack.stack.database_url or "")
    name = make_url(scratch_url).database
    try:
        command.upgrade(alembic_config(scratch_url), "0007")
        rng = np.random.default_rng(8)
        batches = [
            _batch(1, rows=rows).model_copy(
                update={"inputs": rng.normal(size=(rows, 6)), "labels": [f"l{i}" for i in range(rows)]}
            )
            for rows in (3, 1, 5)
        ]
        rows = [row for batch in batches for row in batch.rows()]
        head = link_records(GENESIS_HASH, 1, rows)
        with session_scope(scratch_url) as session:
            session.execute(
                text(
                    "INSERT INTO clients (id, name, api_key_hash, api_key_prefix) VALUES (1, 'c', :h, 'mp_')"
                ),
                {"h": "0" * 64},
            )
            session.execute(
                text("INSERT INTO client_chains (client_id, length, head_hash) VALUES (1, 9, :h)"),
                {"h": head},
            )
            columns = [column for column in rows[0] if column not in ("id", "stored_at")]
            session.execute(
                text(
                    f"INSERT INTO query_records ({', '.join(columns)})"
                    f" VALUES ({', '.join(':' + column for column in columns)})"
                ),
                rows,
            )
            # A detector that had seen up to the 2nd row of the last request (row id 6, seq 6).
            session.execute(
                text(
                    "INSERT INTO suspicion_states (client_id, model_name, detector, last_record_id,"
                    " queries_seen, score, threshold, alarm, explanation, details)"
                    " VALUES (1, 'small-mlp', 'prada', 6, 6, 0, 1, false, '', '{}')"
                )
            )

        def dump() -> list[tuple[Any, ...]]:
            with session_scope(scratch_url) as session:
                return [
                    tuple(row)
                    for row in session.execute(
                        text(f"SELECT {', '.join(columns)} FROM query_records ORDER BY seq")
                    ).all()
                ]

        before = dump()
        upgrade_to_head(scratch_url)
        with session_scope(scratch_url) as session:
            assert session.execute(text("SELECT count(*) FROM query_requests")).scalar_one() == 3
            assert session.execute(text("SELECT last_seq FROM suspicion_states")).scalar_one() == 6
            verification = service.verify_chain(session, 1)
            assert verification.ok, verification
            assert verification.records_checked == 9
            assert [row.record_hash for row in service.iter_queries(session, 1)] == [
                row["record_hash"] for row in rows
            ]
        command.downgrade(alembic_config(scratch_url), "0007")
        assert dump() == before
        with session_scope(scratch_url) as session:
            assert session.execute(text("SELECT last_record_id FROM suspicion_states")).scalar_one() == 6
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
