"""PostgreSQL tables (SQLAlchemy 2) and engine/session factories shared by the services."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Load server-side defaults (ids, timestamps) with RETURNING, so objects stay readable after commit.
    __mapper_args__ = {"eager_defaults": True}


class Client(Base):
    """An API consumer; its key is stored only as a SHA-256 hash."""

    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Model(Base):
    """A deployed model name; its versions hold the artifacts."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version", lazy="selectin"
    )


class ModelVersion(Base):
    """One uploaded skops artifact; its SHA-256 is the model's static fingerprint."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    n_features: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[Any]] = mapped_column(JSONB)
    estimator_type: Mapped[str] = mapped_column(String(200))
    artifact: Mapped[bytes] = mapped_column(LargeBinary)
    reference_data: Mapped[bytes | None] = mapped_column(LargeBinary)
    reference_rows: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    model: Mapped[Model] = relationship(back_populates="versions")


class QueryRequest(Base):
    """One answered request: every row it asked and every answer it got, under which key.

    A request's rows are stored together, packed: `inputs` is the rows' float64 little-endian bytes
    one after another (n_rows x width), `probabilities` likewise, `label_indices` and `labels` one
    entry per row. The rows keep their place in the client's hash chain: row i is record
    `first_seq + i`, its record hash is the i-th 32 bytes of `record_hashes`, and the link before
    the first row is `prev_hash` (shared/chain.py; `services.auditor.service.QueryRow` is one row as
    the API, exports and verification see it). One heap tuple and three index entries per request
    instead of one tuple and four entries per row (migration 0008).
    """

    __tablename__ = "query_requests"
    __table_args__ = (
        # Refuses a request stored twice; the auditor's redelivery check probes it.
        UniqueConstraint("request_id", name="uq_query_requests_request_id"),
        # The client's history in chain order: pages, exports, verification.
        UniqueConstraint("client_id", "first_seq", name="uq_query_requests_client_id_first_seq"),
        # Scoring reads a client's new rows of one model in chain order, and lists the client's models.
        Index("ix_query_requests_client_id_model_name_first_seq", "client_id", "model_name", "first_seq"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"))
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[int] = mapped_column(Integer)
    scheme: Mapped[str] = mapped_column(String(50))
    key_id: Mapped[str] = mapped_column(String(100))
    answered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    first_seq: Mapped[int] = mapped_column(BigInteger)
    n_rows: Mapped[int] = mapped_column(Integer)
    # float64 little-endian bytes, n_rows rows one after another: exact and compact. Stored
    # uncompressed out of line (STORAGE EXTERNAL, migration 0008): float bits barely compress, and
    # PostgreSQL would try on every insert.
    inputs: Mapped[bytes] = mapped_column(LargeBinary)
    probabilities: Mapped[bytes] = mapped_column(LargeBinary)
    label_indices: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    labels: Mapped[list[str]] = mapped_column(ARRAY(Text))
    # The chain link before the first row (hex) and each row's record hash (32 raw bytes per row).
    prev_hash: Mapped[str] = mapped_column(String(64))
    record_hashes: Mapped[bytes] = mapped_column(LargeBinary)


class ClientChain(Base):
    """The head of a client's hash chain; appends lock this row, so the chain is strictly ordered."""

    __tablename__ = "client_chains"

    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), primary_key=True)
    length: Mapped[int] = mapped_column(BigInteger, default=0)
    head_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class SuspicionState(Base):
    """One detector's incremental state and latest result for a client's queries to one model."""

    __tablename__ = "suspicion_states"

    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    detector: Mapped[str] = mapped_column(String(50), primary_key=True)
    state: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The chain position (seq) of the last of the client's rows this detector has seen (migration 0008;
    # before it, a query_records id).
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    queries_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    score: Mapped[float] = mapped_column(Float(precision=53))
    threshold: Mapped[float] = mapped_column(Float(precision=53))
    alarm: Mapped[bool] = mapped_column(Boolean, default=False)
    explanation: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Alert(Base):
    """Something an operator should look at; repeats of an open alert are merged into it."""

    __tablename__ = "alerts"
    __table_args__ = (
        # At most one open alert per kind and subject: repeats update it instead of piling up.
        Index(
            "uq_alerts_open_subject",
            "kind",
            "subject_type",
            "subject_id",
            unique=True,
            postgresql_where=text("acknowledged_at IS NULL"),
        ),
        Index("ix_alerts_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))
    severity: Mapped[str] = mapped_column(String(20))
    subject_type: Mapped[str] = mapped_column(String(20))
    subject_id: Mapped[str] = mapped_column(String(100))
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Webhook(Base):
    """An operator's URL that receives every alert as signed JSON."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    # Needed in clear to sign deliveries; shown to the operator once, never returned again.
    signing_secret: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """One alert's delivery to one webhook, with its retry state."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "webhook_id", "alert_version", name="uq_webhook_deliveries_key"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    alert_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


_application_name = "modelprint"


def set_application_name(service: str) -> None:
    """Name this process's PostgreSQL sessions after its service ("modelprint audit-worker"), so that
    `pg_stat_activity` and the server's logs show which service holds a connection, lock or query.
    Call it before the first engine is made: engines are cached per process."""
    global _application_name
    _application_name = f"modelprint {service}"[:63]  # PostgreSQL keeps at most 63 bytes
    get_engine.cache_clear()


@lru_cache(maxsize=8)
def get_engine(database_url: str) -> Engine:
    """One pooled engine per URL and process."""
    return create_engine(
        database_url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"application_name": _application_name},
    )


def session_factory(database_url: str) -> sessionmaker[Session]:
    """A session factory bound to the URL's engine."""
    return sessionmaker(bind=get_engine(database_url), expire_on_commit=False)


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class Suspect(Base):
    """An endpoint suspected of serving a copy of one of our models."""

    __tablename__ = "suspects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    protocol: Mapped[str] = mapped_column(String(20))
    model_name: Mapped[str] = mapped_column(String(100))
    remote_model: Mapped[str] = mapped_column(String(200))
    suspected_client_id: Mapped[int | None] = mapped_column(ForeignKey("clients.id"))
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    # Sent to the suspect (e.g. its API key); never returned by our API.
    headers: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    next_scan_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Scan(Base):
    """One run of the theft tests against a suspect, with its verdict and evidence report."""

    __tablename__ = "scans"
    __table_args__ = (
        # At most one queued or running scan per suspect: scans never pile up.
        Index(
            "uq_scans_active_suspect",
            "suspect_id",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    suspect_id: Mapped[int] = mapped_column(ForeignKey("suspects.id", ondelete="CASCADE"), index=True)
    trigger: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    verdict: Mapped[str | None] = mapped_column(String(20))
    p_value: Mapped[float | None] = mapped_column(Float(precision=53))
    probes: Mapped[int | None] = mapped_column(Integer)
    tests: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    report_html: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
