"""The registry the auditor publishes to Redis (API keys, active model versions) for the gateway to read.

PostgreSQL stays the source of truth; the auditor rewrites these hashes on every change and on a
beat schedule, so a Redis that lost its data is repaired within one sync interval.
"""

from __future__ import annotations

import redis

from shared.names import REDIS_API_KEYS, REDIS_MODELS
from shared.schemas import ClientIdentity, DeployedModel


def publish_api_key(client: redis.Redis, api_key_hash: str, identity: ClientIdentity) -> None:
    """Make a key usable at the gateway."""
    client.hset(REDIS_API_KEYS, api_key_hash, identity.model_dump_json())


def revoke_api_key(client: redis.Redis, api_key_hash: str) -> None:
    """Make a key unusable at the gateway at once."""
    client.hdel(REDIS_API_KEYS, api_key_hash)


def publish_model(client: redis.Redis, model: DeployedModel) -> None:
    """Route new requests for the model's name to this version."""
    client.hset(REDIS_MODELS, model.name, model.model_dump_json())


def replace_registry(
    client: redis.Redis, api_keys: dict[str, ClientIdentity], models: list[DeployedModel]
) -> None:
    """Rewrite both hashes atomically from the source of truth."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(REDIS_API_KEYS, REDIS_MODELS)
        if api_keys:
            pipe.hset(REDIS_API_KEYS, mapping={h: i.model_dump_json() for h, i in api_keys.items()})
        if models:
            pipe.hset(REDIS_MODELS, mapping={m.name: m.model_dump_json() for m in models})
        pipe.execute()
