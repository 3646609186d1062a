"""The audit outbox: a copy in Redis of every audit message until its rows are committed.

Celery's Redis transport takes a message off its queue (BRPOP) and only then records it as
unacknowledged; a worker killed between the two loses the message, and with it the rows of an
answered request (the fault test that SIGKILLs the audit worker while it consumes hit this in about
one run in ten). So the inference worker writes each audit message to this outbox, in one Redis
transaction, before it enqueues it; the audit worker deletes the entry after the commit; and a beat
task re-sends entries still there after `resend_after` seconds while the audit queue is empty (a
message in the queue, or held by a live worker, is not lost; after an outage the queue drains first).
Inserts are idempotent, so a re-sent message that was not lost after all stores nothing twice.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import redis

from shared.names import QUEUE_AUDIT, REDIS_AUDIT_OUTBOX, REDIS_AUDIT_OUTBOX_INDEX

# Entries re-sent per beat run at most (the rest wait for the next run).
RESEND_LIMIT = 1000


def put(client: redis.Redis, outbox_id: str, payload: dict[str, Any]) -> None:
    """Keep the message (the audit task's keyword arguments) until `remove` (one transaction)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(REDIS_AUDIT_OUTBOX, outbox_id, msgpack.packb(payload))
        pipe.zadd(REDIS_AUDIT_OUTBOX_INDEX, {outbox_id: time.time()})
        pipe.execute()


def remove(commands: redis.Redis, outbox_id: str) -> None:
    """Forget a message whose rows are committed.

    `commands` is a client, or a pipeline (a transaction) that carries other commands in the same
    round trip; the caller executes a pipeline.
    """
    commands.hdel(REDIS_AUDIT_OUTBOX, outbox_id)
    commands.zrem(REDIS_AUDIT_OUTBOX_INDEX, outbox_id)


def pending(client: redis.Redis) -> int:
    """Messages not yet committed (in the queue, being stored, or lost)."""
    return int(client.zcard(REDIS_AUDIT_OUTBOX_INDEX))


def overdue(
    client: redis.Redis, resend_after: float, now: float | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Entries older than `resend_after` seconds, if the audit queue is empty; their clocks restart.

    Returns (outbox id, payload) to send again. With messages waiting in the queue nothing is
    overdue: the auditor is behind (or down), not missing anything, and re-sending would only
    double the backlog.
    """
    if client.llen(QUEUE_AUDIT):
        return []
    now = time.time() if now is None else now
    ids = [
        raw.decode() if isinstance(raw, bytes) else str(raw)
        for raw in client.zrangebyscore(
            REDIS_AUDIT_OUTBOX_INDEX, 0, now - resend_after, start=0, num=RESEND_LIMIT
        )
    ]
    if not ids:
        return []
    payloads = client.hmget(REDIS_AUDIT_OUTBOX, ids)
    found: list[tuple[str, dict[str, Any]]] = []
    with client.pipeline(transaction=False) as pipe:
        for outbox_id, raw in zip(ids, payloads, strict=True):
            if raw is None:  # removed meanwhile
                pipe.zrem(REDIS_AUDIT_OUTBOX_INDEX, outbox_id)
                continue
            found.append((outbox_id, msgpack.unpackb(raw)))
            pipe.zadd(REDIS_AUDIT_OUTBOX_INDEX, {outbox_id: now})
        pipe.execute()
    return found
