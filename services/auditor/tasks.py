"""Celery tasks of the auditor (audit queue) and its beat schedule: thin wrappers around the service."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import redis
from celery.signals import worker_process_init
from sqlalchemy.exc import InterfaceError, OperationalError

from services.auditor import service
from services.auditor.config import AuditorSettings
from shared.celery_app import create_celery_app
from shared.db import session_scope
from shared.logs import configure_logging
from shared.names import QUEUE_AUDIT, TASK_RECORD_QUERIES, TASK_SYNC_REGISTRY
from shared.schemas import QueryBatch

logger = logging.getLogger(__name__)

settings = AuditorSettings()
app = create_celery_app(settings, main="modelprint-auditor")
app.conf.beat_schedule = {
    "sync-registry": {
        "task": TASK_SYNC_REGISTRY,
        "schedule": settings.registry_sync_seconds,
        "options": {"queue": QUEUE_AUDIT, "expires": settings.registry_sync_seconds},
    },
}


@lru_cache(maxsize=1)
def registry_client() -> redis.Redis:
    """This process's connection for the registry."""
    return redis.Redis.from_url(settings.require_redis_url())


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    configure_logging("auditor", settings.log_level, settings.log_format)


@app.task(
    name=TASK_RECORD_QUERIES,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def record_queries(**payload: Any) -> int:
    """Store one request's answered rows; redelivery after a crash inserts nothing twice."""
    batch = QueryBatch.model_validate(payload)
    with session_scope(settings.require_database_url()) as session:
        inserted = service.store_query_batch(session, batch)
    logger.debug("queries stored", extra={"request_id": batch.request_id, "inserted": inserted})
    return inserted


@app.task(name=TASK_SYNC_REGISTRY, autoretry_for=(OperationalError, redis.ConnectionError), max_retries=3)
def sync_registry() -> dict[str, int]:
    """Rewrite the gateway's registry in Redis from PostgreSQL."""
    with session_scope(settings.require_database_url()) as session:
        keys, models = service.sync_registry(session, registry_client())
    return {"api_keys": keys, "models": models}
