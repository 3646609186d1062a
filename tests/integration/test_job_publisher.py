"""The gateway's job publisher pushes the message that Celery's own `send_task` would push."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from kombu.serialization import loads

from services.gateway.publisher import JobPublisher
from shared.celery_app import FAST_SERIALIZER, create_celery_app
from shared.config import Settings
from shared.names import QUEUE_INFERENCE, TASK_PREDICT
from shared.schemas import PredictJob, pack_rows
from tests.conftest import RunningStack, side_redis_url

pytestmark = pytest.mark.integration


def _payload(job_id: str) -> dict[str, Any]:
    rows = np.random.default_rng(7).normal(size=(3, 5))
    return {
        "job_id": job_id,
        "reply_to": "modelprint:replies:test",
        "model": "demo",
        "version": 2,
        "requests": [
            {
                "request_id": "r" * 32,
                "client_id": 9,
                "instances": pack_rows(rows),
                "received_at": "2026-11-25T05:00:00+00:00",
            }
        ],
    }


def _without_varying(message: dict[str, Any]) -> dict[str, Any]:
    """The message minus what differs between any two publishes: the delivery tag, the expiry time."""
    copy = json.loads(json.dumps(message))
    del copy["properties"]["delivery_tag"]
    del copy["headers"]["expires"]
    return copy


def test_published_job_equals_celerys_own_message(running_stack: RunningStack) -> None:
    url = side_redis_url(running_stack)
    side = redis.Redis.from_url(url)
    side.delete(QUEUE_INFERENCE)
    celery = create_celery_app(Settings(redis_url=url), main="test-publisher")
    job_id = "j" * 32
    kwargsrepr = "{job: 1 request, 3 rows}"
    try:
        celery.send_task(
            TASK_PREDICT,
            kwargs=_payload(job_id),
            queue=QUEUE_INFERENCE,
            task_id=job_id,
            serializer=FAST_SERIALIZER,
            expires=10.0,
            declare=[],
            argsrepr="()",
            kwargsrepr=kwargsrepr,
        )

        async def publish() -> None:
            client = aioredis.Redis.from_url(url)
            publisher = JobPublisher(celery, client, QUEUE_INFERENCE, FAST_SERIALIZER)
            publisher._reply_to = celery.thread_oid  # send_task ran in this thread
            await publisher.publish(
                publisher.message(TASK_PREDICT, job_id, _payload(job_id), 10.0, "()", kwargsrepr)
            )
            await client.aclose()

        asyncio.run(publish())
    finally:
        celery.close()
    ours, celerys = (json.loads(raw) for raw in side.lrange(QUEUE_INFERENCE, 0, -1))  # LPUSH: newest first
    side.delete(QUEUE_INFERENCE)
    side.close()
    assert _without_varying(ours) == _without_varying(celerys)
    expires = [datetime.fromisoformat(message["headers"]["expires"]) for message in (ours, celerys)]
    assert abs((expires[0] - expires[1]).total_seconds()) < 5
    # The body decodes, as a worker decodes it, to the job the gateway meant.
    args, kwargs, _embed = loads(
        base64.b64decode(ours["body"]),
        ours["content-type"],
        ours["content-encoding"],
        accept={"application/x-msgpack"},
    )
    assert args == []
    job = PredictJob.model_validate(kwargs)
    assert job.job_id == job_id
    np.testing.assert_array_equal(job.requests[0].instances, np.random.default_rng(7).normal(size=(3, 5)))
