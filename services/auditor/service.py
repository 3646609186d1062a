"""Auditor logic: clients and keys, model deployment, query records, and the Redis registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db import Client, Model, ModelVersion, QueryRecord
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


def create_client(session: Session, name: str) -> NewClient:
    """Create a client with a new API key (publish it with `publish_client` after the commit)."""
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


def store_query_batch(session: Session, batch: QueryBatch) -> int:
    """Insert a request's rows in one statement; rows already stored are skipped (idempotent)."""
    rows = batch.rows()
    if not rows:
        return 0
    statement = (
        insert(QueryRecord)
        .values(rows)
        .on_conflict_do_nothing(constraint="uq_query_records_request_id_row_index")
        .returning(QueryRecord.id)
    )
    return len(session.execute(statement).all())


def list_queries(session: Session, client_id: int, after_id: int, limit: int) -> list[QueryRecord]:
    """A page of a client's query records in storage order, after a cursor."""
    get_client(session, client_id)
    return list(
        session.scalars(
            select(QueryRecord)
            .where(QueryRecord.client_id == client_id, QueryRecord.id > after_id)
            .order_by(QueryRecord.id)
            .limit(limit)
        )
    )


def count_queries(session: Session, client_id: int) -> int:
    """How many rows a client has been answered."""
    return int(session.scalar(select(func.count()).where(QueryRecord.client_id == client_id)) or 0)


def sync_registry(session: Session, registry: redis.Redis) -> tuple[int, int]:
    """Rewrite the Redis registry from PostgreSQL; returns (active keys, models)."""
    api_keys = {
        client.api_key_hash: ClientIdentity(client_id=client.id, name=client.name)
        for client in session.scalars(select(Client).where(Client.disabled_at.is_(None)))
    }
    models = [
        deployed_model(model.name, model.versions[-1]) for model in list_models(session) if model.versions
    ]
    replace_registry(registry, api_keys, models)
    return len(api_keys), len(models)
