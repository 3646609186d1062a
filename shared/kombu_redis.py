"""kombu's Redis transport, with one Redis client per channel instead of one per operation.

kombu's Redis channel builds a new `redis.Redis` client for every synchronous operation: each publish,
each acknowledgement, each record of an unacknowledged message. With redis-py 8 building one costs
about 100 µs of CPU (it copies the table of response callbacks), more than the command itself costs;
a task with late acknowledgement paid it twice where it was consumed (its unacknowledged record, its
ack), and every publish once (bench/cpu_breakdown.py's profiles showed it). A client is thread-safe
(each command takes a connection from the pool), so the channel keeps one for its connection pool and
builds it again only when kombu replaces the pool (after a disconnect). The asynchronous client
kombu's event loop reads with is kombu's own, already kept per channel. Selected by
`broker_transport` (shared/celery_app.py).

Acknowledging a message taken without acknowledgements (a queue consumed with `no_ack`, as solo
inference workers do) is a no-op here. Celery acknowledges every task with late acknowledgement
whatever its queue, and kombu's Redis QoS then removed the message from its unacknowledged records,
where it never was: a MULTI/ZREM/HDEL/EXEC round trip per job for nothing.

Message bodies are base64 on the wire, as kombu writes them, but decoded (and encoded) by pybase64's
vectorised routines instead of the standard library's: a batch-80 job of five requests carries
340 KB of base64, which `base64.b64decode` took about 0.9 ms to decode (10-12% of an inference
worker's CPU under batch-80 load in py-spy) and pybase64 about 0.02 ms. The alphabet and padding
are the standard ones, so either side may run the stock codec; a body pybase64 rejects in strict
mode (line breaks or other characters outside the alphabet, which the stock decoder skips) is
decoded by the stock decoder, as before.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import pybase64
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import Base64 as KombuBase64
from kombu.utils.encoding import str_to_bytes


class Base64(KombuBase64):
    """kombu's base64 body codec, the same text and bytes, faster."""

    def encode(self, s: str | bytes) -> str:
        return pybase64.b64encode(str_to_bytes(s)).decode("ascii")

    def decode(self, s: str | bytes) -> bytes:
        try:
            return pybase64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            return base64.b64decode(str_to_bytes(s))


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: Any) -> None:
        # Only messages this channel recorded (consumed with acknowledgements) are in its records.
        if delivery_tag in self._delivered:
            super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if delivery_tag in self._delivered:
            super().reject(delivery_tag, requeue=requeue)


class Channel(kombu_redis.Channel):
    QoS = QoS
    codecs = {"base64": Base64()}
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
