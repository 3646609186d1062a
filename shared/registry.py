"""The registry the auditor publishes to Redis (API keys, active model versions) for the gateway to read.

PostgreSQL stays the source of truth; the auditor rewrites these hashes on every change and on a
beat schedule, so a Redis that lost its data is repaired within one sync interval. Every change also
publishes a message on `REDIS_REGISTRY_CHANNEL` in the same transaction, on which gateways drop the
entries they keep (services/gateway/registry_cache.py): a revoked key stops working at once.
"""

from __future__ import annotations

from collections.abc import Callable

import redis
from redis.client import Pipeline

from shared.names import REDIS_API_KEYS, REDIS_MODELS, REDIS_REGISTRY_CHANNEL
from shared.schemas import ClientIdentity, DeployedModel


def _change(client: redis.Redis, reason: str, apply: Callable[[Pipeline], object]) -> None:
    """Apply a change and announce it to the gateways, atomically."""
    with client.pipeline(transaction=True) as pipe:
        apply(pipe)
        pipe.publish(REDIS_REGISTRY_CHANNEL, reason)
        pipe.execute()


def publish_api_key(client: redis.Redis, api_key_hash: str, identity: ClientIdentity) -> None:
    """Make a key usable at the gateway."""
    entry = identity.model_dump_json()
    _change(client, "api-key", lambda pipe: pipe.hset(REDIS_API_KEYS, api_key_hash, entry))


def revoke_api_key(client: redis.Redis, api_key_hash: str) -> None:
    """Make a key unusable at the gateway at once."""
    _change(client, "api-key", lambda pipe: pipe.hdel(REDIS_API_KEYS, api_key_hash))


def publish_model(client: redis.Redis, model: DeployedModel) -> None:
    """Route new requests for the model's name to this version."""
    _change(client, "model", lambda pipe: pipe.hset(REDIS_MODELS, model.name, model.model_dump_json()))


def replace_registry(
    client: redis.Redis, api_keys: dict[str, ClientIdentity], models: list[DeployedModel]
) -> None:
    """Rewrite both hashes atomically from the source of truth."""

    def rewrite(pipe: Pipeline) -> None:
        pipe.delete(REDIS_API_KEYS, REDIS_MODELS)
        if api_keys:
            pipe.hset(REDIS_API_KEYS, mapping={h: i.model_dump_json() for h, i in api_keys.items()})
        if models:
            pipe.hset(REDIS_MODELS, mapping={m.name: m.model_dump_json() for m in models})

    _change(client, "sync", rewrite)
