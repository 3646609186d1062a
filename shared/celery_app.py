"""The one Celery configuration every service uses."""

from __future__ import annotations

from collections.abc import Collection

from celery import Celery
from kombu import Queue

from shared.config import Settings
from shared.names import (
    ALL_QUEUES,
    QUEUE_AUDIT,
    QUEUE_INFERENCE,
    QUEUE_SCANS,
    QUEUE_SCORING,
    TASK_DRAIN_AUDIT,
    TASK_PREDICT,
    TASK_RECORD_QUERIES,
    TASK_RUN_SCAN,
    TASK_SCORE_CLIENT,
)

# The prediction path's messages (a job's rows) go as msgpack, as do the outbox's audit messages:
# kombu's JSON takes about 5 ms to encode and 3 ms to decode a batch of 80 rows x 80 floats, msgpack
# 0.2 ms.
# Other tasks keep JSON, which also carries dates.
FAST_SERIALIZER = "msgpack"


def create_celery_app(
    settings: Settings, main: str = "modelprint", no_ack_queues: Collection[str] = ()
) -> Celery:
    """A Celery app bound to the settings' Redis, with explicit queues and at-least-once delivery.

    A worker consumes the `no_ack_queues` without acknowledgements: a message is the worker's once
    taken off the queue, with no record of it kept in Redis until it is acknowledged.
    """
    app = Celery(main, broker=settings.require_redis_url())
    app.conf.update(
        # kombu's Redis transport with one client per channel instead of one per operation.
        broker_transport="shared.kombu_redis:Transport",
        task_serializer="json",
        accept_content=["json", FAST_SERIALIZER],
        result_serializer="json",
        # Replies to the gateway travel on a Redis pub/sub channel; no result backend needed.
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_queues=[Queue(name, no_ack=name in no_ack_queues) for name in ALL_QUEUES],
        task_default_queue=QUEUE_AUDIT,
        task_create_missing_queues=False,
        task_routes={
            TASK_PREDICT: {"queue": QUEUE_INFERENCE},
            TASK_RECORD_QUERIES: {"queue": QUEUE_AUDIT},
            TASK_DRAIN_AUDIT: {"queue": QUEUE_AUDIT},
            TASK_RUN_SCAN: {"queue": QUEUE_SCANS},
            TASK_SCORE_CLIENT: {"queue": QUEUE_SCORING},
        },
        task_soft_time_limit=120,
        task_time_limit=180,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            # Sweep for messages a dead worker left unacknowledged every few seconds (kombu's default
            # sweep runs only every ~100 s), so they return to the queue soon after the timeout.
            "unacked_restore_interval": max(1, min(10, settings.broker_visibility_timeout // 2)),
            "unacked_restore_throttle": 1,
            # The sweep holds a Redis mutex; a worker killed or frozen while holding it blocks every
            # sweep until it expires (kombu's default: 300 s). A sweep takes milliseconds.
            "unacked_mutex_expire": max(5, min(60, settings.broker_visibility_timeout)),
            "socket_connect_timeout": 5,
        },
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app
