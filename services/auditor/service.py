"""Auditor logic: clients and keys, model deployment, query records, and the Redis registry."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.chain import GENESIS_HASH, link_records, record_hash
from shared.db import Client, ClientChain, Model, ModelVersion, QueryRecord
from shared.modelfile import describe_classifier, load_model_bytes, load_reference_data
from shared.registry import publish_api_key, publish_model, replace_registry, revoke_api_key
from shared.schemas import ClientIdentity, DeployedModel, QueryBatch
from shared.security import display_prefix, generate_api_key, hash_api_key

logger = logging.getLogger(__name__)


class NotFoundError(LookupError):
    """The named client or model does not exist."""


@dataclass(frozen=True)
class NewClient:
    """A freshly created client and its key, which is shown exactly once."""

    client: Client
    api_key: str


# The registry in Redis is written two ways: each change publishes its own entry after its commit, and
# `sync_registry` rewrites the whole registry from PostgreSQL. Without coordination a sync could read
# PostgreSQL just before a change commits and rewrite Redis just after the change published itself,
# wiping a new key or a new model version (or bringing back a key being disabled) until the next sync.
# So every change holds this advisory lock shared until its commit, and a sync holds it exclusively
# from before its read until after its rewrite: a sync then either sees the change or runs before it.
REGISTRY_LOCK_ID = 0x6D70_7265_6769  # "mpregi": any constant unique to this purpose


def lock_registry_for_change(session: Session) -> None:
    """Hold off registry syncs until this transaction ends (call before changing a published entry)."""
    session.execute(text("SELECT pg_advisory_xact_lock_shared(:lock)"), {"lock": REGISTRY_LOCK_ID})


def create_client(session: Session, name: str) -> NewClient:
    """Create a client with a new API key (publish it with `publish_client` after the commit)."""
    lock_registry_for_change(session)
    api_key = generate_api_key()
    client = Client(name=name, api_key_hash=hash_api_key(api_key), api_key_prefix=display_prefix(api_key))
    session.add(client)
    session.flush()
    logger.info("client created", extra={"client_id": client.id, "client_name": name})
    return NewClient(client, api_key)


def publish_client(registry: redis.Redis, client: Client) -> None:
    """Make a committed client's key usable at the gateway."""
    if client.disabled_at is None:
        publish_api_key(registry, client.api_key_hash, ClientIdentity(client_id=client.id, name=client.name))


def get_client(session: Session, client_id: int) -> Client:
    """The client with this id, or NotFoundError."""
    client = session.get(Client, client_id)
    if client is None:
        raise NotFoundError(f"no client with id {client_id}")
    return client


def list_clients(session: Session) -> list[Client]:
    """All clients, oldest first."""
    return list(session.scalars(select(Client).order_by(Client.id)))


def set_client_disabled(session: Session, registry: redis.Redis, client_id: int, disabled: bool) -> Client:
    """Disable (the key stops working at once, before the commit) or re-enable a client."""
    lock_registry_for_change(session)
    client = get_client(session, client_id)
    if disabled:
        if client.disabled_at is None:
            client.disabled_at = datetime.now(UTC)
        revoke_api_key(registry, client.api_key_hash)
    else:
        client.disabled_at = None
    session.flush()
    logger.info("client %s", "disabled" if disabled else "enabled", extra={"client_id": client_id})
    return client


def deploy_model(session: Session, name: str, artifact: bytes, reference_data: bytes | None) -> ModelVersion:
    """Validate a skops artifact (and reference data) and store it as the model's next version."""
    estimator = load_model_bytes(artifact)
    info = describe_classifier(estimator, artifact)
    reference_rows = None
    if reference_data is not None:
        features, _ = load_reference_data(reference_data, info.n_features)
        reference_rows = int(features.shape[0])
    lock_registry_for_change(session)
    model = session.scalar(select(Model).where(Model.name == name).with_for_update())
    if model is None:
        model = Model(name=name)
        session.add(model)
        session.flush()
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))
    version = ModelVersion(
        model_id=model.id,
        version=(latest or 0) + 1,
        sha256=info.sha256,
        n_features=info.n_features,
        classes=info.classes,
        estimator_type=info.estimator_type,
        artifact=artifact,
        reference_data=reference_data,
        reference_rows=reference_rows,
    )
    session.add(version)
    session.flush()
    logger.info("model deployed", extra={"model": name, "version": version.version, "sha256": info.sha256})
    return version


def publish_version(registry: redis.Redis, name: str, version: ModelVersion) -> None:
    """Route new gateway requests for the model to this committed version."""
    publish_model(registry, deployed_model(name, version))


def deployed_model(name: str, version: ModelVersion) -> DeployedModel:
    """The registry entry for a model version."""
    return DeployedModel(
        name=name,
        version=version.version,
        n_features=version.n_features,
        classes=version.classes,
        sha256=version.sha256,
    )


def list_models(session: Session) -> list[Model]:
    """All models with their versions."""
    return list(session.scalars(select(Model).order_by(Model.name)))


def get_model(session: Session, name: str) -> Model:
    """The model with this name, or NotFoundError."""
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFoundError(f"no model named {name!r}")
    return model


# The columns a query record is inserted with and their PostgreSQL types (binary COPY needs the exact
# types; tests/integration check them against the table).
QUERY_RECORD_COLUMN_TYPES = (
    ("request_id", "varchar"),
    ("row_index", "int4"),
    ("client_id", "int4"),
    ("model_name", "varchar"),
    ("model_version", "int4"),
    ("scheme", "varchar"),
    ("key_id", "varchar"),
    ("answered_at", "timestamptz"),
    ("input", "bytea"),
    ("probabilities", "bytea"),
    ("label_index", "int4"),
    ("label", "text"),
    ("seq", "int8"),
    ("prev_hash", "varchar"),
    ("record_hash", "varchar"),
)
QUERY_RECORD_COLUMNS = tuple(column for column, _ in QUERY_RECORD_COLUMN_TYPES)


def lock_chain(session: Session, client_id: int) -> ClientChain:
    """The client's chain head, locked until the transaction ends (appends are strictly ordered)."""
    session.execute(
        insert(ClientChain)
        .values(client_id=client_id, length=0, head_hash=GENESIS_HASH)
        .on_conflict_do_nothing(index_elements=["client_id"])
    )
    return session.execute(
        select(ClientChain).where(ClientChain.client_id == client_id).with_for_update()
    ).scalar_one()


@dataclass(frozen=True)
class StoredBatch:
    """How many rows a batch added, and the client's chain length before and after."""

    inserted: int
    length_before: int
    length_after: int


def store_query_batch(session: Session, batch: QueryBatch) -> StoredBatch:
    """Append a request's rows to the client's hash chain with one COPY; redelivered rows are skipped."""
    return store_client_batches(session, batch.client_id, [batch])


def store_client_batches(session: Session, client_id: int, batches: list[QueryBatch]) -> StoredBatch:
    """Append several requests of one client, in order, under one chain lock and with one COPY."""
    if any(batch.client_id != client_id for batch in batches):
        raise ValueError(f"every batch must belong to client {client_id}")
    chain = lock_chain(session, client_id)
    # Under the chain lock, a concurrent redelivery of the same batches sees these rows once committed.
    stored = stored_requests(session, [batch.request_id for batch in batches])
    rows = [row for batch in batches if batch.request_id not in stored for row in batch.rows()]
    length_before = chain.length
    if not rows:
        return StoredBatch(0, length_before, length_before)
    chain.head_hash = link_records(chain.head_hash, chain.length + 1, rows)
    chain.length += len(rows)
    copy_rows(session, rows)
    session.flush()
    return StoredBatch(len(rows), length_before, chain.length)


# Which of these requests are stored already: one probe of the unique index per request, for its
# first row. A request's rows are stored together (one COPY, one transaction), so the first row
# stands for all of them, and the index holds first rows only (uq_query_records_request_id_first_row,
# migration 0007; it also refuses a request stored twice). The probe's `row_index = 0` matches the
# index's predicate and its equality on request_id its unique key, so the planner expects at most
# one row per request whatever its statistics say. The query it replaced, `request_id IN (...)`, was
# planned with the default selectivity of an unanalysed column (0.5% of the table per id) until
# autovacuum first analysed the table, which for a drain of 30 requests meant a sequential scan of
# the whole table in every transaction; on a table growing by 21,000 rows/s the first analysis came
# late (bench.cpu_breakdown, PostgreSQL by session).
STORED_REQUESTS = text(
    "SELECT r.request_id FROM unnest(CAST(:request_ids AS varchar[])) AS r(request_id) "
    "WHERE EXISTS (SELECT 1 FROM query_records q WHERE q.request_id = r.request_id AND q.row_index = 0)"
)


def stored_requests(session: Session, request_ids: list[str]) -> set[str]:
    """The request ids among these whose rows are in query_records already (redeliveries)."""
    return set(session.execute(STORED_REQUESTS, {"request_ids": request_ids}).scalars())


def store_query_batches(session: Session, batches: list[QueryBatch]) -> dict[int, StoredBatch]:
    """Store a job's requests, each client's together; chains are locked in client order (no deadlock)."""
    by_client: dict[int, list[QueryBatch]] = {}
    for batch in batches:
        by_client.setdefault(batch.client_id, []).append(batch)
    return {
        client_id: store_client_batches(session, client_id, by_client[client_id])
        for client_id in sorted(by_client)
    }


def copy_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Bulk-insert query records with a binary PostgreSQL COPY inside the session's transaction.

    Binary rather than text: no hex encoding of the inputs and probabilities for PostgreSQL to decode,
    no text to escape or parse, and psycopg's compiled row writer. Against the text COPY formatted by
    hand it replaced, per stored 80-feature row: PostgreSQL 10.0-10.6 against 13.7-16.9 µs of CPU,
    the worker 2.0-3.6 against 7.9-9.5 µs (16,000-row transactions, embedded PostgreSQL); in the
    stack PostgreSQL's share fell by about 0.5 ms per batch-80 request, the audit worker's did not
    move beyond noise (README, Benchmarks).
    """
    connection = session.connection().connection.driver_connection
    assert connection is not None
    columns = ", ".join(QUERY_RECORD_COLUMNS)
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY query_records ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types([kind for _, kind in QUERY_RECORD_COLUMN_TYPES])
        for row in rows:
            copy.write_row([row[column] for column in QUERY_RECORD_COLUMNS])


@dataclass(frozen=True)
class ChainVerification:
    """The outcome of recomputing a client's hash chain."""

    client_id: int
    ok: bool
    records_checked: int
    stored_length: int
    head_hash: str
    stored_head_hash: str
    first_broken_seq: int | None
    first_broken_record_id: int | None
    reason: str | None


def verify_chain(session: Session, client_id: int, chunk_size: int = 5000) -> ChainVerification:
    """Recompute every link of a client's chain; report the first broken one, if any."""
    get_client(session, client_id)
    chain = session.get(ClientChain, client_id)
    stored_length = chain.length if chain else 0
    stored_head = chain.head_hash if chain else GENESIS_HASH
    expected_prev = GENESIS_HASH
    expected_seq = 1
    checked = 0
    statement = (
        select(QueryRecord)
        .where(QueryRecord.client_id == client_id)
        .order_by(QueryRecord.seq)
        .execution_options(yield_per=chunk_size)
    )

    def broken(record: QueryRecord | None, reason: str) -> ChainVerification:
        return ChainVerification(
            client_id,
            False,
            checked,
            stored_length,
            expected_prev,
            stored_head,
            record.seq if record is not None else expected_seq,
            record.id if record is not None else None,
            reason,
        )

    with sorts_as_last_resort(session):
        records = session.scalars(statement)  # planned and opened here, read below
    for record in records:
        values = {column: getattr(record, column) for column in QUERY_RECORD_COLUMNS if column != "client_id"}
        values["client_id"] = record.client_id
        if record.seq != expected_seq:
            return broken(
                record, f"expected record #{expected_seq} but found #{record.seq} (a record is missing)"
            )
        if record.prev_hash != expected_prev:
            return broken(record, f"record #{record.seq} does not link to the record before it")
        if record_hash(expected_prev, values) != record.record_hash:
            return broken(record, f"record #{record.seq} (id {record.id}) was modified after it was stored")
        expected_prev = record.record_hash
        expected_seq += 1
        checked += 1
    session.expunge_all()
    if checked != stored_length or expected_prev != stored_head:
        return broken(
            None, f"the chain head says {stored_length} records but {checked} were found (records deleted)"
        )
    return ChainVerification(
        client_id, True, checked, stored_length, expected_prev, stored_head, None, None, None
    )


@contextmanager
def sorts_as_last_resort(session: Session) -> Iterator[None]:
    """Within this block, PostgreSQL plans a sort only when nothing else gives the order asked for.

    For reads of a client's history in index order (a page after a cursor, the whole chain by seq):
    until autovacuum first analyses query_records, PostgreSQL guesses that a client's rows are a
    small share of the table and plans a bitmap scan of all of them plus a sort, so each page of
    the history API read the rest of the history (3,677 blocks against 3 for a page of 100 rows of
    a 240,000-row table without statistics, `tests/integration/test_audit_service.py`). The index
    already holds the rows in order. Statements executed in the block are planned with the setting;
    an error ends the transaction, which drops it too.
    """
    session.execute(text("SET LOCAL enable_sort = off"))
    yield
    session.execute(text("SET LOCAL enable_sort TO DEFAULT"))


def list_queries(session: Session, client_id: int, after_id: int, limit: int) -> list[QueryRecord]:
    """A page of a client's query records in storage order, after a cursor."""
    get_client(session, client_id)
    with sorts_as_last_resort(session):
        return list(
            session.scalars(
                select(QueryRecord)
                .where(QueryRecord.client_id == client_id, QueryRecord.id > after_id)
                .order_by(QueryRecord.id)
                .limit(limit)
            )
        )


def iter_queries(session: Session, client_id: int, chunk_size: int = 5000) -> Iterator[QueryRecord]:
    """Every record of a client in chain order, fetched in chunks (constant memory)."""
    statement = (
        select(QueryRecord)
        .where(QueryRecord.client_id == client_id)
        .order_by(QueryRecord.seq)
        .execution_options(yield_per=chunk_size)
    )
    with sorts_as_last_resort(session):
        records = session.scalars(statement)  # planned and opened here, read below
    yield from records


def record_export(record: QueryRecord) -> dict[str, Any]:
    """A record as exported: everything needed to re-verify its chain link offline."""
    return {
        "id": record.id,
        "seq": record.seq,
        "client_id": record.client_id,
        "request_id": record.request_id,
        "row_index": record.row_index,
        "model_name": record.model_name,
        "model_version": record.model_version,
        "scheme": record.scheme,
        "key_id": record.key_id,
        "answered_at": record.answered_at.isoformat(),
        "input": floats(record.input),
        "probabilities": floats(record.probabilities),
        "label_index": record.label_index,
        "label": record.label,
        "prev_hash": record.prev_hash,
        "record_hash": record.record_hash,
    }


def floats(data: bytes) -> list[float]:
    """A stored float64 little-endian array as a list of floats."""
    return np.frombuffer(data, dtype="<f8").tolist()


def export_npz(session: Session, client_id: int) -> bytes:
    """A client's history as an .npz of arrays (inputs, probabilities, labels, ids, hashes), no pickle."""
    records = [record_export(record) for record in iter_queries(session, client_id)]
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        id=np.array([r["id"] for r in records], dtype=np.int64),
        seq=np.array([r["seq"] for r in records], dtype=np.int64),
        request_id=np.array([r["request_id"] for r in records], dtype=str),
        row_index=np.array([r["row_index"] for r in records], dtype=np.int64),
        model_name=np.array([r["model_name"] for r in records], dtype=str),
        model_version=np.array([r["model_version"] for r in records], dtype=np.int64),
        key_id=np.array([r["key_id"] for r in records], dtype=str),
        answered_at=np.array([r["answered_at"] for r in records], dtype=str),
        inputs=_ragged_to_matrix([r["input"] for r in records]),
        probabilities=_ragged_to_matrix([r["probabilities"] for r in records]),
        label_index=np.array([r["label_index"] for r in records], dtype=np.int64),
        label=np.array([r["label"] for r in records], dtype=str),
        record_hash=np.array([r["record_hash"] for r in records], dtype=str),
    )
    return buffer.getvalue()


def _ragged_to_matrix(rows: list[list[float]]) -> np.ndarray:
    # Rows of different models can differ in width; pad with NaN so the archive stays one array.
    width = max((len(row) for row in rows), default=0)
    matrix = np.full((len(rows), width), np.nan)
    for index, row in enumerate(rows):
        matrix[index, : len(row)] = row
    return matrix


def count_queries(session: Session, client_id: int) -> int:
    """How many rows a client has been answered."""
    return int(session.scalar(select(func.count()).where(QueryRecord.client_id == client_id)) or 0)


def sync_registry(session: Session, registry: redis.Redis) -> tuple[int, int]:
    """Rewrite the Redis registry from PostgreSQL; returns (active keys, models)."""
    # Exclusive until this transaction ends, i.e. after the rewrite below (see REGISTRY_LOCK_ID).
    session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": REGISTRY_LOCK_ID})
    api_keys = {
        client.api_key_hash: ClientIdentity(client_id=client.id, name=client.name)
        for client in session.scalars(select(Client).where(Client.disabled_at.is_(None)))
    }
    models = [
        deployed_model(model.name, model.versions[-1]) for model in list_models(session) if model.versions
    ]
    replace_registry(registry, api_keys, models)
    return len(api_keys), len(models)
