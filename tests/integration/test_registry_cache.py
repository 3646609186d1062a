"""The gateway's registry cache against the real Redis: changes are announced and empty it at once.

The Dispatcher under test reads database 15 of the stack's Redis (nothing there is consumed); Redis's
pub/sub is not per database, so it also hears the stack's own registry changes, which only empty it.
"""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from services.gateway.config import GatewaySettings
from services.gateway.registry_cache import RegistryCache
from services.gateway.service import Dispatcher, client_and_model
from shared.celery_app import create_celery_app
from shared.http import ApiError
from shared.names import QUEUE_INFERENCE, REDIS_API_KEYS, REDIS_MODELS, REDIS_REGISTRY_CHANNEL
from shared.registry import publish_api_key, publish_model, replace_registry, revoke_api_key
from shared.schemas import ClientIdentity, DeployedModel
from shared.security import hash_api_key
from tests.conftest import RunningStack, async_wait_until, side_redis_url, wait_until

pytestmark = pytest.mark.integration

KEY = "mp_registry_cache_key"
IDENTITY = ClientIdentity(client_id=41, name="cached")
MODEL = DeployedModel(name="cached-model", version=1, n_features=3, classes=[0, 1], sha256="cd" * 32)


def test_every_registry_change_is_announced_with_it(running_stack: RunningStack) -> None:
    side = redis.Redis.from_url(side_redis_url(running_stack))
    pubsub = side.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(REDIS_REGISTRY_CHANNEL)
    try:
        key_hash = hash_api_key(KEY)
        publish_api_key(side, key_hash, IDENTITY)
        assert side.hget(REDIS_API_KEYS, key_hash) is not None
        revoke_api_key(side, key_hash)
        assert side.hget(REDIS_API_KEYS, key_hash) is None
        publish_model(side, MODEL)
        replace_registry(side, {key_hash: IDENTITY}, [MODEL])
        heard: list[bytes] = []

        def four_heard() -> bool:
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                heard.append(message["data"])
            return len(heard) >= 4

        # The stack's auditor may announce its own periodic rewrite meanwhile ("sync").
        wait_until(four_heard, 10, "four announcements")
        assert [reason for reason in heard if reason != b"sync"] == [b"api-key", b"api-key", b"model"]
        assert b"sync" in heard
    finally:
        side.delete(REDIS_API_KEYS, REDIS_MODELS)
        pubsub.close()
        side.close()


async def _cached_lookups(running_stack: RunningStack) -> None:
    url = side_redis_url(running_stack)
    settings = GatewaySettings(redis_url=url)
    gateway_redis = aioredis.Redis.from_url(url, client_name="registry-cache-test")
    side = redis.Redis.from_url(url)
    cache = RegistryCache(30.0, backlog_max_age=0.3)
    dispatcher = Dispatcher(
        create_celery_app(settings, main="test-registry-cache"),
        gateway_redis,
        timeout=1,
        max_backlog=10,
        registry_cache=cache,
    )
    key_hash = hash_api_key(KEY)
    side.delete(REDIS_API_KEYS, REDIS_MODELS, QUEUE_INFERENCE)
    side.hset(REDIS_API_KEYS, key_hash, IDENTITY.model_dump_json())
    side.hset(REDIS_MODELS, MODEL.name, MODEL.model_dump_json())
    side.rpush(QUEUE_INFERENCE, b"a waiting job")

    async def lookup() -> tuple[ClientIdentity, DeployedModel, int]:
        return await client_and_model(gateway_redis, f"Bearer {KEY}", MODEL.name, cache)

    await dispatcher.start()
    try:
        await async_wait_until(lambda: cache.active, 10, "the registry subscription confirmed")
        assert await lookup() == (IDENTITY, MODEL, 1)
        side.rpush(QUEUE_INFERENCE, b"another")
        assert await lookup() == (IDENTITY, MODEL, 1)  # from the cache
        assert (cache.hits, cache.misses) == (1, 1)
        # Not with a queue length older than backlog_max_age: Redis is read again.
        await asyncio.sleep(0.4)
        assert await lookup() == (IDENTITY, MODEL, 2)
        assert cache.misses == 2
        assert await lookup() == (IDENTITY, MODEL, 2)
        hits = cache.hits
        generation = cache.generation
        revoke_api_key(side, key_hash)
        await async_wait_until(lambda: cache.generation > generation, 5, "the revocation announced")
        with pytest.raises(ApiError) as revoked:
            await lookup()
        assert revoked.value.status_code == 401
        assert cache.hits == hits
        generation_before_publish = cache.generation
        # A lost subscription switches the cache off until Redis confirms it again, emptied.
        publish_api_key(side, key_hash, IDENTITY)
        await async_wait_until(lambda: cache.generation > generation_before_publish, 5, "announcement heard")
        assert await lookup() == (IDENTITY, MODEL, 2)
        generation = cache.generation
        ours = [
            client["id"]
            for client in side.client_list(_type="pubsub")
            if client.get("name") == "registry-cache-test"
        ]
        assert len(ours) == 1
        side.client_kill_filter(_id=ours[0])
        await async_wait_until(lambda: cache.generation >= generation + 2, 10, "the subscription renewed")
        await async_wait_until(lambda: cache.active, 10, "the registry subscription confirmed again")
        misses = cache.misses
        assert await lookup() == (IDENTITY, MODEL, 2)
        assert cache.misses == misses + 1
    finally:
        await dispatcher.stop()
        side.delete(REDIS_API_KEYS, REDIS_MODELS, QUEUE_INFERENCE)
        side.close()
        await gateway_redis.aclose()


def test_the_gateway_keeps_registry_entries_until_a_change_is_announced(running_stack: RunningStack) -> None:
    asyncio.run(_cached_lookups(running_stack))
