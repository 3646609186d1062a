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

from shared.chain import GENESIS_HASH, link_request, record_hash
from shared.db import Client, ClientChain, Model, ModelVersion, QueryRequest
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


# The columns a stored request is inserted with and their PostgreSQL types (binary COPY needs the exact
# types; tests/integration check them against the table).
QUERY_REQUEST_COLUMN_TYPES = (
    ("request_id", "varchar"),
    ("client_id", "int4"),
    ("model_name", "varchar"),
    ("model_version", "int4"),
    ("scheme", "varchar"),
    ("key_id", "varchar"),
    ("answered_at", "timestamptz"),
    ("first_seq", "int8"),
    ("n_rows", "int4"),
    ("inputs", "bytea"),
    ("probabilities", "bytea"),
    ("label_indices", "int4[]"),
    ("labels", "text[]"),
    ("prev_hash", "varchar"),
    ("record_hashes", "bytea"),
)
QUERY_REQUEST_COLUMNS = tuple(column for column, _ in QUERY_REQUEST_COLUMN_TYPES)


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
    """Append a request's rows to the client's hash chain with one COPY; a redelivery is skipped."""
    return store_client_batches(session, batch.client_id, [batch])


def store_client_batches(session: Session, client_id: int, batches: list[QueryBatch]) -> StoredBatch:
    """Append several requests of one client, in order, under one chain lock and with one COPY."""
    if any(batch.client_id != client_id for batch in batches):
        raise ValueError(f"every batch must belong to client {client_id}")
    chain = lock_chain(session, client_id)
    # Under the chain lock, a concurrent redelivery of the same batches sees these rows once committed.
    stored = stored_requests(session, [batch.request_id for batch in batches])
    length_before = chain.length
    head_hash = chain.head_hash
    next_seq = chain.length + 1
    requests = []
    for batch in batches:
        if batch.request_id in stored or not batch.label_indices:
            continue
        stored.add(batch.request_id)  # the same request twice in one drain is stored once
        request = packed_request(batch, next_seq, head_hash)
        requests.append(request)
        head_hash = request["record_hashes"][-32:].hex()
        next_seq += request["n_rows"]
    if not requests:
        return StoredBatch(0, length_before, length_before)
    chain.head_hash = head_hash
    chain.length = next_seq - 1
    copy_requests(session, requests)
    session.flush()
    return StoredBatch(chain.length - length_before, length_before, chain.length)


def packed_request(batch: QueryBatch, first_seq: int, prev_hash: str) -> dict[str, Any]:
    """A request as one insertable row: its arrays packed, each of its rows linked into the chain."""
    inputs = np.ascontiguousarray(batch.inputs, dtype="<f8").tobytes()
    probabilities = np.ascontiguousarray(batch.probabilities, dtype="<f8").tobytes()
    fields = batch.shared_fields()
    record_hashes = link_request(
        prev_hash, first_seq, fields, inputs, probabilities, batch.label_indices, batch.labels
    )
    return {
        **fields,
        "first_seq": first_seq,
        "n_rows": len(batch.label_indices),
        "inputs": inputs,
        "probabilities": probabilities,
        "label_indices": batch.label_indices,
        "labels": batch.labels,
        "prev_hash": prev_hash,
        "record_hashes": record_hashes,
    }


# Which of these requests are stored already (redeliveries): one probe of the unique index on
# request_id per request.
STORED_REQUESTS = text(
    "SELECT r.request_id FROM unnest(CAST(:request_ids AS varchar[])) AS r(request_id) "
    "WHERE EXISTS (SELECT 1 FROM query_requests q WHERE q.request_id = r.request_id)"
)


def stored_requests(session: Session, request_ids: list[str]) -> set[str]:
    """The request ids among these that are in query_requests already (redeliveries)."""
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


def copy_requests(session: Session, requests: list[dict[str, Any]]) -> None:
    """Bulk-insert stored requests with a binary PostgreSQL COPY inside the session's transaction.

    Binary: the packed arrays go as they are, with no hex encoding for PostgreSQL to decode and no
    text to escape or parse.
    """
    connection = session.connection().connection.driver_connection
    assert connection is not None
    columns = ", ".join(QUERY_REQUEST_COLUMNS)
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY query_requests ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types([kind for _, kind in QUERY_REQUEST_COLUMN_TYPES])
        for request in requests:
            copy.write_row([request[column] for column in QUERY_REQUEST_COLUMNS])


@dataclass(frozen=True)
class QueryRow:
    """One answered input row of a stored request, as the history API, exports and verification see it.

    `seq` is the row's position in the client's history (1 for the first row it was ever answered),
    which is also its place in the hash chain; `input` and `probabilities` are float64
    little-endian bytes.
    """

    seq: int
    request_id: str
    row_index: int
    client_id: int
    model_name: str
    model_version: int
    scheme: str
    key_id: str
    answered_at: datetime
    input: bytes
    probabilities: bytes
    label_index: int
    label: str
    prev_hash: str
    record_hash: str

    def chain_fields(self) -> dict[str, Any]:
        """The fields `shared.chain.record_hash` covers (in the order an export lists them)."""
        return {
            "seq": self.seq,
            "client_id": self.client_id,
            "request_id": self.request_id,
            "row_index": self.row_index,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "scheme": self.scheme,
            "key_id": self.key_id,
            "answered_at": self.answered_at,
            "input": self.input,
            "probabilities": self.probabilities,
            "label_index": self.label_index,
            "label": self.label,
        }


def request_rows(request: QueryRequest, first_row: int = 0) -> list[QueryRow]:
    """A stored request's rows from `first_row` on, unpacked."""
    n_rows = request.n_rows
    input_width = len(request.inputs) // n_rows
    probability_width = len(request.probabilities) // n_rows
    hashes = request.record_hashes
    rows = []
    for index in range(first_row, n_rows):
        rows.append(
            QueryRow(
                seq=request.first_seq + index,
                request_id=request.request_id,
                row_index=index,
                client_id=request.client_id,
                model_name=request.model_name,
                model_version=request.model_version,
                scheme=request.scheme,
                key_id=request.key_id,
                answered_at=request.answered_at,
                input=request.inputs[index * input_width : (index + 1) * input_width],
                probabilities=request.probabilities[
                    index * probability_width : (index + 1) * probability_width
                ],
                label_index=request.label_indices[index],
                label=request.labels[index],
                prev_hash=request.prev_hash if index == 0 else hashes[(index - 1) * 32 : index * 32].hex(),
                record_hash=hashes[index * 32 : (index + 1) * 32].hex(),
            )
        )
    return rows


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
    first_broken_request_id: str | None
    reason: str | None


def _requests_in_chain_order(session: Session, client_id: int, chunk_size: int) -> Iterator[QueryRequest]:
    statement = (
        select(QueryRequest)
        .where(QueryRequest.client_id == client_id)
        .order_by(QueryRequest.first_seq)
        .execution_options(yield_per=chunk_size)
    )
    with sorts_as_last_resort(session):
        requests = session.scalars(statement)  # planned and opened here, read below
    for request in requests:
        yield request
        session.expunge(request)


def verify_chain(session: Session, client_id: int, chunk_size: int = 100) -> ChainVerification:
    """Recompute every link of a client's chain; report the first broken one, if any."""
    get_client(session, client_id)
    chain = session.get(ClientChain, client_id)
    stored_length = chain.length if chain else 0
    stored_head = chain.head_hash if chain else GENESIS_HASH
    expected_prev = GENESIS_HASH
    expected_seq = 1
    checked = 0

    def broken(seq: int, request_id: str | None, reason: str) -> ChainVerification:
        return ChainVerification(
            client_id, False, checked, stored_length, expected_prev, stored_head, seq, request_id, reason
        )

    for request in _requests_in_chain_order(session, client_id, chunk_size):
        if request.first_seq != expected_seq:
            return broken(
                request.first_seq,
                request.request_id,
                f"expected record #{expected_seq} but found #{request.first_seq} (a record is missing)",
            )
        if not _well_formed(request):
            return broken(
                request.first_seq,
                request.request_id,
                f"request {request.request_id} (records #{request.first_seq}-"
                f"#{request.first_seq + request.n_rows - 1}) was modified after it was stored",
            )
        for row in request_rows(request):
            if row.prev_hash != expected_prev:
                return broken(
                    row.seq, row.request_id, f"record #{row.seq} does not link to the record before it"
                )
            if record_hash(expected_prev, row.chain_fields()) != row.record_hash:
                return broken(
                    row.seq,
                    row.request_id,
                    f"record #{row.seq} (row {row.row_index} of request {row.request_id}) was modified"
                    " after it was stored",
                )
            expected_prev = row.record_hash
            expected_seq += 1
            checked += 1
    if checked != stored_length or expected_prev != stored_head:
        return broken(
            expected_seq,
            None,
            f"the chain head says {stored_length} records but {checked} were found (records deleted)",
        )
    return ChainVerification(
        client_id, True, checked, stored_length, expected_prev, stored_head, None, None, None
    )


def _well_formed(request: QueryRequest) -> bool:
    """Whether a stored request's packed arrays agree with its row count (else it cannot be unpacked)."""
    n_rows = request.n_rows
    return (
        n_rows > 0
        and len(request.inputs) % (8 * n_rows) == 0
        and len(request.probabilities) % (8 * n_rows) == 0
        and len(request.label_indices) == n_rows
        and len(request.labels) == n_rows
        and len(request.record_hashes) == 32 * n_rows
    )


@contextmanager
def sorts_as_last_resort(session: Session) -> Iterator[None]:
    """Within this block, PostgreSQL plans a sort only when nothing else gives the order asked for.

    For reads of a client's history in index order (a page after a cursor, the whole chain by seq):
    until autovacuum first analyses the table, PostgreSQL may guess that a client's requests are a
    small share of it and plan a bitmap scan of all of them plus a sort, so each page of the history
    API would read the rest of the history (measured on query_records, the per-row table before
    migration 0008: 3,677 blocks against 3 for a page of 100 rows of a 240,000-row table without
    statistics). The index already holds the requests in order. Statements executed in the block are
    planned with the setting; an error ends the transaction, which drops it too.
    """
    session.execute(text("SET LOCAL enable_sort = off"))
    yield
    session.execute(text("SET LOCAL enable_sort TO DEFAULT"))


def list_queries(session: Session, client_id: int, after_seq: int, limit: int) -> list[QueryRow]:
    """A page of a client's answered rows in chain order, after a cursor (the last seq seen)."""
    get_client(session, client_id)
    # The request holding row `after_seq + 1` starts at or before it: the last one starting there.
    start = session.scalar(
        select(func.coalesce(func.max(QueryRequest.first_seq), 1)).where(
            QueryRequest.client_id == client_id, QueryRequest.first_seq <= after_seq + 1
        )
    )
    rows: list[QueryRow] = []
    with sorts_as_last_resort(session):
        requests = session.scalars(
            select(QueryRequest)
            .where(QueryRequest.client_id == client_id, QueryRequest.first_seq >= start)
            .order_by(QueryRequest.first_seq)
            .limit(limit)  # each request holds at least one row
            .execution_options(yield_per=16)
        )
        for request in requests:
            rows.extend(request_rows(request, max(after_seq + 1 - request.first_seq, 0)))
            if len(rows) >= limit:
                break
        requests.close()
    return rows[:limit]


def iter_queries(session: Session, client_id: int, chunk_size: int = 100) -> Iterator[QueryRow]:
    """Every answered row of a client in chain order, read a chunk of requests at a time."""
    for request in _requests_in_chain_order(session, client_id, chunk_size):
        yield from request_rows(request)


def record_export(record: QueryRow) -> dict[str, Any]:
    """A row as exported: everything needed to re-verify its chain link offline."""
    return {
        **record.chain_fields(),
        "answered_at": record.answered_at.isoformat(),
        "input": floats(record.input),
        "probabilities": floats(record.probabilities),
        "prev_hash": record.prev_hash,
        "record_hash": record.record_hash,
    }


def floats(data: bytes) -> list[float]:
    """A stored float64 little-endian array as a list of floats."""
    return np.frombuffer(data, dtype="<f8").tolist()


def export_npz(session: Session, client_id: int) -> bytes:
    """A client's history as an .npz of arrays (inputs, probabilities, labels, seqs, hashes), no pickle."""
    records = [record_export(record) for record in iter_queries(session, client_id)]
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
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
    return int(
        session.scalar(select(func.sum(QueryRequest.n_rows)).where(QueryRequest.client_id == client_id)) or 0
    )


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
