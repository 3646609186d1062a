"""The audit outbox: every audit message waits in Redis until its rows are committed, and the auditor
drains it several messages per transaction.

Why an outbox. Celery's Redis transport takes a message off its queue (BRPOP) and only then records
it as unacknowledged; a worker killed between the two loses the message, and with it the rows of an
answered request (the fault test that SIGKILLs the audit worker hit this in about one run in ten).
So the payload never travels in a Celery message: the inference worker writes it here, and the audit
worker deletes it only after the commit.

Why drained. Storing one job's message costs a transaction, a chain lock, a COPY and a WAL flush
whatever its size; at 200 single-row requests/s almost every job holds one request, and the auditor
could not keep up one message at a time. A drain claims every waiting message (up to a limit) and
stores them in one transaction, so the busier the stack, the larger and cheaper each commit.

The protocol, each step atomic in Redis (a Lua script or a transaction), with times from Redis's own
clock so that hosts whose clocks drift apart still agree on what is claimable:

- `put` (inference worker): the payload into a hash, its id into a sorted set scored by the time it
  becomes claimable (now), and a "drain queued" flag set if absent. The caller enqueues a drain
  task only when it set the flag, so a burst of jobs wakes the auditor once.
- `claim` (drain task): take up to `limit` claimable entries (oldest first) and push their score
  `lease` seconds ahead: another drain, on this host or another, does not take them while this one
  stores them, and takes them again if this one dies before `remove`. A claim that finds entries
  keeps the flag set (and renews its expiry): the drain claims again after storing them, so puts
  meanwhile need no drain of their own. Only a claim that finds nothing clears the flag, in the same
  atomic step, so a `put` either is in a claim or comes after the flag is gone and queues a drain.
  (An earlier version cleared the flag at every claim: each claim of a running drain let the next
  put queue one more drain task, and under steady load the audit queue grew by thousands of no-op
  drains a minute, ahead of the registry syncs and webhooks that share the queue.)
- `remove` (after the commit): forget the stored entries.

A drain task lost from the queue leaves its flag set until it expires (`FLAG_TTL_SECONDS`); a beat
task queues a drain whenever entries have been claimable for longer than that (`waiting`).
Inserts are idempotent (by request id), so an entry stored twice (a drain killed after its commit,
a lease that ran out under a slow commit) adds no row twice.
"""

from __future__ import annotations

from typing import Any

import msgpack
import redis
from redis.commands.core import Script

from shared.names import (
    REDIS_AUDIT_DRAIN_QUEUED,
    REDIS_AUDIT_OUTBOX,
    REDIS_AUDIT_OUTBOX_INDEX,
    REDIS_AUDIT_OUTBOX_REJECTED,
)

# The "drain queued" flag expires after this long: a lost drain task delays storing by at most this
# (the next `put` or the beat queues another).
FLAG_TTL_SECONDS = 5

# Redis's clock (TIME) unless the caller passes a non-negative `now` (tests).
_NOW = """
local now = tonumber(ARGV[1])
if now < 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: outbox hash, index, flag[, reply channel]. ARGV: now, id, payload, flag TTL[, reply].
# Returns 1 if it set the flag. The reply, if any, is published after the message is kept.
_PUT_SCRIPT = (
    _NOW
    + """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[2])
local flagged = 0
if redis.call('SET', KEYS[3], 1, 'NX', 'EX', tonumber(ARGV[4])) then
    flagged = 1
end
if #KEYS > 3 then
    redis.call('PUBLISH', KEYS[4], ARGV[5])
end
return flagged
"""
)

# KEYS: outbox hash, index, flag. ARGV: now, limit, lease seconds, flag TTL.
# Returns [id1, payload1, id2, payload2, ...]; index entries whose payload is gone are dropped. The flag
# is renewed when something was claimed and cleared when nothing was.
_CLAIM_SCRIPT = (
    _NOW
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local until_ = now + tonumber(ARGV[3])
local found = {}
for _, id in ipairs(ids) do
    local payload = redis.call('HGET', KEYS[1], id)
    if payload then
        redis.call('ZADD', KEYS[2], until_, id)
        found[#found + 1] = id
        found[#found + 1] = payload
    else
        redis.call('ZREM', KEYS[2], id)
    end
end
if #found > 0 then
    redis.call('SET', KEYS[3], 1, 'EX', tonumber(ARGV[4]))
else
    redis.call('DEL', KEYS[3])
end
return found
"""
)

# KEYS: index. ARGV: now, ids... Claimed entries become claimable now.
_RELEASE_SCRIPT = (
    _NOW
    + """
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
end
return 0
"""
)

# KEYS: index. ARGV: now, seconds. Entries claimable for longer than that.
_WAITING_SCRIPT = _NOW + "return redis.call('ZCOUNT', KEYS[1], '-inf', now - tonumber(ARGV[2]))"

_scripts: dict[str, Script] = {}


def _run(client: redis.Redis, source: str, keys: list[str], args: list[Any]) -> Any:
    """Run a script by its SHA (loaded on first use)."""
    script = _scripts.get(source)
    if script is None:
        script = _scripts[source] = Script(None, source.encode())  # type: ignore[arg-type]
    return script(keys=keys, args=args, client=client)


def _time(now: float | None) -> str:
    return "-1" if now is None else repr(now)


def put(
    client: redis.Redis,
    outbox_id: str,
    payload: dict[str, Any],
    now: float | None = None,
    reply: tuple[str, str | bytes] | None = None,
) -> bool:
    """Keep an audit message (a job's batches) until `remove`; True if the caller must queue a drain.

    With `reply` (channel, message), the same atomic step then publishes the answers the message
    records: one round trip instead of two, and no reply can leave before its record is kept.
    """
    keys = [REDIS_AUDIT_OUTBOX, REDIS_AUDIT_OUTBOX_INDEX, REDIS_AUDIT_DRAIN_QUEUED]
    args: list[Any] = [_time(now), outbox_id, msgpack.packb(payload), FLAG_TTL_SECONDS]
    if reply is not None:
        keys.append(reply[0])
        args.append(reply[1])
    return bool(_run(client, _PUT_SCRIPT, keys, args))


def claim(
    client: redis.Redis, limit: int, lease_seconds: float, now: float | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Take up to `limit` claimable messages, oldest first, for `lease_seconds` (see the module doc).

    Returns (outbox id, payload) pairs; an empty list when nothing waits, in which case the "drain
    queued" flag is cleared (the caller's drain ends: the next put queues another). Otherwise the flag
    stays set and the caller must claim again once it has stored these.
    """
    keys = [REDIS_AUDIT_OUTBOX, REDIS_AUDIT_OUTBOX_INDEX, REDIS_AUDIT_DRAIN_QUEUED]
    args = [_time(now), limit, repr(float(lease_seconds)), FLAG_TTL_SECONDS]
    raw = _run(client, _CLAIM_SCRIPT, keys, args)
    return [(_text(raw[i]), msgpack.unpackb(raw[i + 1])) for i in range(0, len(raw), 2)]


def release(client: redis.Redis, outbox_ids: list[str], now: float | None = None) -> None:
    """Make claimed messages claimable again at once (their drain failed before the commit)."""
    if outbox_ids:
        _run(client, _RELEASE_SCRIPT, [REDIS_AUDIT_OUTBOX_INDEX], [_time(now), *outbox_ids])


def remove(commands: redis.Redis, outbox_ids: list[str]) -> None:
    """Forget messages whose rows are committed.

    `commands` is a client, or a pipeline (a transaction) that carries other commands in the same
    round trip; the caller executes a pipeline.
    """
    if outbox_ids:
        commands.hdel(REDIS_AUDIT_OUTBOX, *outbox_ids)
        commands.zrem(REDIS_AUDIT_OUTBOX_INDEX, *outbox_ids)


def reject(client: redis.Redis, outbox_id: str) -> None:
    """Move a message that cannot be stored (it does not parse, or PostgreSQL refuses its rows) out of
    the outbox, for an operator."""
    payload = client.hget(REDIS_AUDIT_OUTBOX, outbox_id)
    with client.pipeline(transaction=True) as pipe:
        if payload is not None:
            pipe.hset(REDIS_AUDIT_OUTBOX_REJECTED, outbox_id, payload)
        remove(pipe, [outbox_id])
        pipe.execute()


def pending(client: redis.Redis) -> int:
    """Messages not yet committed (waiting, or being stored)."""
    return int(client.zcard(REDIS_AUDIT_OUTBOX_INDEX))


def waiting(client: redis.Redis, longer_than: float, now: float | None = None) -> int:
    """Messages claimable for more than `longer_than` seconds: no drain has come for them."""
    return int(
        _run(client, _WAITING_SCRIPT, [REDIS_AUDIT_OUTBOX_INDEX], [_time(now), repr(float(longer_than))])
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
