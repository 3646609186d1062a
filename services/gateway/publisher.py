"""Prediction jobs published as Celery task messages with the gateway's asyncio Redis client.

Celery's `send_task` publishes through kombu's synchronous Redis client, so the gateway ran it in a
worker thread: per job a thread hand-off, kombu's publish machinery and a blocking round trip, about
a third of the gateway's CPU per single-row request (`bench.cpu_breakdown --profile gateway`). Here the
message is still Celery's and kombu's: the task message (protocol 2 headers, properties and body) comes
from `app.amqp.create_task_message`, as `send_task` makes it, the body is serialised by kombu's
serializer registry, and the envelope is the one kombu's Redis transport pushes onto the queue's list
(anonymous exchange, priority 0, body in base64, encoded by the codec of the workers' transport:
shared/kombu_redis.py). Only the LPUSH is ours, awaited on the event loop.
tests/integration/test_job_publisher.py checks that a message published here and one published by
`send_task` are the same, and the workers consume them in every end-to-end test.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from celery import Celery
from kombu.serialization import dumps as serialize
from redis import asyncio as aioredis

from shared.kombu_redis import Base64

# kombu's default message priority and Celery's persistent delivery mode.
_PRIORITY = 0
_PERSISTENT = 2
# The body codec of the workers' transport, so that the gateway encodes as they decode.
_BODY_CODEC = Base64()


class JobPublisher:
    """Builds a task's Celery message for one queue and pushes it with an asyncio Redis client."""

    def __init__(self, celery: Celery, redis_client: aioredis.Redis, queue: str, serializer: str) -> None:
        self.celery = celery
        self.redis = redis_client
        self.queue = queue
        self.serializer = serializer
        self._reply_to = celery.thread_oid

    def message(
        self,
        task: str,
        task_id: str,
        kwargs: dict[str, Any],
        expires: float,
        argsrepr: str,
        kwargsrepr: str,
    ) -> bytes:
        """The message `send_task(task, kwargs=..., queue=..., task_id=..., expires=...)` would push.

        The envelope is JSON as kombu writes it, encoded with orjson: the standard library's encoder
        scanned the base64 body (68 KB for 80 rows of 80 features) for characters to escape and took
        about 8% of the gateway's CPU under batch-80 load (py-spy).
        """
        headers, properties, body, _ = self.celery.amqp.create_task_message(
            task_id,
            task,
            (),
            kwargs,
            expires=expires,
            reply_to=self._reply_to,
            ignore_result=None,  # as send_task leaves it: the app's setting (ignore) applies
            argsrepr=argsrepr,
            kwargsrepr=kwargsrepr,
        )
        content_type, content_encoding, data = serialize(body, serializer=self.serializer)
        raw = data if isinstance(data, bytes) else data.encode(content_encoding)
        properties = {
            **properties,
            # send_task passes its options on as message properties too.
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "delivery_mode": _PERSISTENT,
            "expiration": str(int(expires * 1000)),
            "delivery_info": {"exchange": "", "routing_key": self.queue},
            "priority": _PRIORITY,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        envelope = {
            "body": _BODY_CODEC.encode(raw),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": properties,
        }
        return orjson.dumps(envelope)

    async def publish(self, message: bytes) -> int:
        """Push a message from `message` onto the queue and return the queue's length after the push
        (RedisError when Redis is unreachable)."""
        return int(await self.redis.lpush(self.queue, message))
