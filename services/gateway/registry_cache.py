"""The gateway's short-lived copy of the registry entries it has read, dropped whenever the registry changes.

Every prediction needs the client of its API key, the model's active version and the inference queue's
length. Read from Redis they cost one pipelined round trip per request: about 150 µs of latency and
140 µs of the gateway's CPU (redis-py's asyncio pipeline), as much as a fifth of what the gateway
spends on a single-row request. So the gateway keeps what it read:

- **Dropped on every change.** The auditor publishes a message on `REDIS_REGISTRY_CHANNEL` in the same
  Redis transaction as every change of the registry (a key created or revoked, a client disabled, a
  model version activated, the periodic rewrite from PostgreSQL: `shared/registry.py`). The gateway
  listens on the connection it reads its replies on and empties the cache on each message, so a
  revoked key stops working as soon as the message arrives, as it did when every request read Redis.
- **Only while that subscription is live.** The cache serves nothing until Redis has confirmed the
  subscription, and is emptied and switched off whenever the connection is lost (a message may have
  been missed), until the next confirmation.
- **No stale write-back.** A read that was in flight when a change arrived is not kept (the cache
  counts changes: `generation`), since Redis may have answered it before the change.
- **Bounded.** An entry lives `ttl` seconds at most (a backstop for a registry edited by hand,
  without the message); at most `max_entries` keys and models are kept; unknown keys and models
  (401, 404) are never cached, so a key created a moment ago is read from Redis like any unknown one.
- **The queue's length stays fresh.** A hit also needs a reading of the inference queue's length
  younger than `backlog_max_age` (the lookup's, or the length Redis returned when the gateway last
  pushed a job), so a full queue is refused (503) and a drained one accepted again as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.schemas import ClientIdentity, DeployedModel


class RegistryCache:
    """API key hash -> client and model name -> deployed version, for a few seconds (module doc)."""

    def __init__(
        self,
        ttl: float,
        *,
        backlog_max_age: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.backlog_max_age = backlog_max_age
        self.max_entries = max_entries
        self._clock = clock
        self.active = False
        # How many times the cache was emptied: a read that began under another generation is not kept.
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._clients: dict[str, tuple[float, ClientIdentity]] = {}
        self._models: dict[str, tuple[float, DeployedModel]] = {}
        self._backlog: tuple[float, int] | None = None

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def activate(self) -> None:
        """The invalidation subscription is confirmed: start serving (empty)."""
        self.invalidate()
        self.active = self.enabled

    def deactivate(self) -> None:
        """The subscription is lost: serve nothing until it is confirmed again."""
        self.active = False
        self.invalidate()

    def invalidate(self) -> None:
        """Forget every entry (the registry changed, or a change may have been missed)."""
        self.generation += 1
        self._clients.clear()
        self._models.clear()

    def observe_backlog(self, jobs: int) -> None:
        """The inference queue held `jobs` jobs just now (besides the one just pushed, if any)."""
        self._backlog = (self._clock(), jobs)

    def lookup(self, key_hash: str, model_name: str) -> tuple[ClientIdentity, DeployedModel, int] | None:
        """The key's client, the model and the queue's length, if all three are known and fresh."""
        if not self.active:
            return None
        now = self._clock()
        client = self._clients.get(key_hash)
        model = self._models.get(model_name)
        backlog = self._backlog
        if (
            client is None
            or model is None
            or backlog is None
            or now - client[0] > self.ttl
            or now - model[0] > self.ttl
            or now - backlog[0] > self.backlog_max_age
        ):
            self.misses += 1
            return None
        self.hits += 1
        return client[1], model[1], backlog[1]

    def store(
        self,
        generation: int,
        key_hash: str,
        client: ClientIdentity,
        model_name: str,
        model: DeployedModel,
        backlog: int,
    ) -> None:
        """Keep what a lookup that began at `generation` read (dropped if the registry changed since)."""
        if not self.active or generation != self.generation:
            return
        if len(self._clients) >= self.max_entries or len(self._models) >= self.max_entries:
            self.invalidate()  # for room, not for a change: this lookup's reading is still current
        now = self._clock()
        self._clients[key_hash] = (now, client)
        self._models[model_name] = (now, model)
        self._backlog = (now, backlog)
