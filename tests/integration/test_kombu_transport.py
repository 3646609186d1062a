"""kombu's Redis transport with one client per channel (shared/kombu_redis.py), against the real Redis."""

from __future__ import annotations

import json

import pytest
import redis
from kombu import Message

from shared.celery_app import create_celery_app
from shared.config import Settings
from shared.kombu_redis import Transport
from shared.names import QUEUE_AUDIT, QUEUE_INFERENCE
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


def test_acknowledging_sends_nothing_for_a_message_taken_without_acknowledgements(
    running_stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery acknowledges late-acked tasks whatever their queue; for a queue consumed with no_ack the
    message was never recorded as unacknowledged, so the acknowledgement must cost no round trip. A
    queue consumed with acknowledgements still records the message until it is acknowledged."""
    url = side_redis_url(running_stack)
    side = redis.Redis.from_url(url)
    side.delete(QUEUE_INFERENCE, QUEUE_AUDIT, "unacked", "unacked_index")
    app = create_celery_app(Settings(redis_url=url), main="test-acks", no_ack_queues=(QUEUE_INFERENCE,))
    pipelines: list[object] = []
    original_execute = redis.client.Pipeline.execute

    def counting_execute(self: redis.client.Pipeline, *args: object, **kwargs: object) -> object:
        pipelines.append(self.command_stack[:])
        return original_execute(self, *args, **kwargs)  # type: ignore[arg-type]

    try:
        for queue in (QUEUE_INFERENCE, QUEUE_AUDIT):
            app.send_task("demo.task", kwargs={"queue": queue}, queue=queue)
        received: dict[str, Message] = {}
        with app.connection_for_read() as connection:
            queues = [
                queue for queue in app.amqp.queues.values() if queue.name in (QUEUE_INFERENCE, QUEUE_AUDIT)
            ]
            with connection.Consumer(
                queues,
                callbacks=[
                    lambda body, message: received.update({message.delivery_info["routing_key"]: message})
                ],
            ):
                while len(received) < 2:
                    connection.drain_events(timeout=5)
                assert side.hlen("unacked") == 1  # the audit message only
                monkeypatch.setattr(redis.client.Pipeline, "execute", counting_execute)
                received[QUEUE_INFERENCE].ack()
                assert pipelines == []
                received[QUEUE_AUDIT].ack()
                assert len(pipelines) == 1
                assert side.hlen("unacked") == 0
    finally:
        app.close()
        side.delete(QUEUE_INFERENCE, QUEUE_AUDIT, "unacked", "unacked_index")
        side.close()
