"""kombu's Redis transport with one client per channel (shared/kombu_redis.py), against the real Redis."""

from __future__ import annotations

import json

import pytest
import redis

from shared.celery_app import create_celery_app
from shared.config import Settings
from shared.kombu_redis import Transport
from shared.names import QUEUE_INFERENCE
from tests.conftest import RunningStack, side_redis_url

pytestmark = pytest.mark.integration


def test_publishing_builds_one_client_per_channel_and_delivers_every_message(
    running_stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = side_redis_url(running_stack)
    side = redis.Redis.from_url(url)
    side.delete(QUEUE_INFERENCE)
    built: list[object] = []
    original_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(self)
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    app = create_celery_app(Settings(redis_url=url), main="test-transport")
    try:
        with app.producer_or_acquire() as producer:
            assert isinstance(producer.connection.transport, Transport)
            for index in range(50):
                app.send_task("demo.task", kwargs={"index": index}, queue=QUEUE_INFERENCE, producer=producer)
            channel = producer.channel
            first = channel._create_client()
            assert channel._create_client() is first
            # kombu drops its pools after a connection error; the next client uses the new pool.
            channel._disconnect_pools()
            replaced = channel._create_client()
            assert replaced is not first
            assert replaced.connection_pool is channel.pool
    finally:
        app.close()
    # kombu's stock transport built one client per publish (50 here).
    assert len(built) <= 3, f"{len(built)} Redis clients built for 50 publishes"
    queued = [json.loads(message) for message in side.lrange(QUEUE_INFERENCE, 0, -1)]
    assert sorted(message["headers"]["task"] for message in queued) == ["demo.task"] * 50
    side.delete(QUEUE_INFERENCE)
    side.close()
