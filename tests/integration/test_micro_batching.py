"""The gateway's micro-batcher against the real Redis, Celery and inference worker.

Concurrent requests are coalesced into one inference job; each caller must get exactly its own
rows' answers (the same as when asked alone), an error in one request must not touch the others,
and every answered row must reach its own client's audit history.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from services.gateway.config import GatewaySettings
from services.gateway.service import AdmissionControl, Dispatcher, audit_lag, client_and_model, deployed_model
from shared.celery_app import create_celery_app
from shared.http import ApiError
from shared.names import QUEUE_INFERENCE, REDIS_API_KEYS, REDIS_AUDIT_LAG, REDIS_MODELS
from shared.schemas import ClientIdentity, DeployedModel, PredictReply
from shared.security import hash_api_key
from tests.conftest import DeployedTestModel, RunningStack, async_wait_until, side_redis_url, wait_until

pytestmark = pytest.mark.integration


async def _dispatch(
    running_stack: RunningStack,
    model_name: str,
    requests: list[tuple[int, np.ndarray]],
    window: float,
    max_job_rows: int = 1024,
    eager_jobs: int = 0,
    send_lone: bool = False,
) -> tuple[list[PredictReply | BaseException], int]:
    """Send the requests concurrently through a Dispatcher; (replies or errors, jobs sent)."""
    settings = GatewaySettings(redis_url=running_stack.stack.redis_url)
    redis_client = aioredis.Redis.from_url(settings.require_redis_url())
    celery = create_celery_app(settings, main="test-micro-batching")
    dispatcher = Dispatcher(
        celery,
        redis_client,
        timeout=30,
        max_backlog=5000,
        window=window,
        max_job_rows=max_job_rows,
        eager_jobs=eager_jobs,
        send_lone=send_lone,
    )
    await dispatcher.start()
    try:
        model = await deployed_model(redis_client, model_name)
        replies = await _predict_all(dispatcher, model, requests)
        assert dispatcher.jobs_in_flight == 0  # every request settled its job's bookkeeping
        return replies, dispatcher.jobs_sent
    finally:
        await dispatcher.stop()
        await redis_client.aclose()
        celery.close()


async def _predict_all(
    dispatcher: Dispatcher, model: DeployedModel, requests: list[tuple[int, np.ndarray]]
) -> list[PredictReply | BaseException]:
    replies = await asyncio.gather(
        *(
            dispatcher.predict(ClientIdentity(client_id=client_id, name="batcher"), model, rows, backlog=0)
            for client_id, rows in requests
        ),
        return_exceptions=True,
    )
    return list(replies)


def test_coalesced_requests_get_their_own_answers_and_audit_rows(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    clients = [running_stack.new_client("batched") for _ in range(3)]
    sizes = [1, 5, 2, 1, 7, 3]
    requests = [
        (clients[index % 3][0], small_model.X[10 * index : 10 * index + size])
        for index, size in enumerate(sizes)
    ]
    replies, jobs = asyncio.run(_dispatch(running_stack, small_model.name, requests, window=0.3))
    assert jobs == 1  # all six arrived within the window: one task, one audit message, one reply
    _, gateway, _ = running_stack.new_client("alone")  # its own history: the batched clients' stay exact
    with gateway:
        for (_, rows), reply in zip(requests, replies, strict=True):
            assert isinstance(reply, PredictReply)
            assert reply.ok
            assert [reply.classes[i] for i in reply.label_indices] == small_model.estimator.predict(
                rows
            ).tolist()
            alone = gateway.predict(small_model.name, rows.tolist())
            # The same fingerprinted answer as alone; the matrix product may round differently in the
            # last bit for another batch size (as for any two batch sizes), so compare to 1e-12.
            np.testing.assert_allclose(
                [p["probabilities"] for p in alone["predictions"]], reply.probabilities, rtol=1e-12, atol=0
            )
    for client_id, _, _ in clients:
        expected = sum(len(rows) for owner, rows in requests if owner == client_id)
        wait_until(
            lambda client_id=client_id, expected=expected: running_stack.query_count(client_id) == expected,
            30,
            f"client {client_id}'s {expected} coalesced rows in its audit history",
            interval=0.5,
        )
    answered = {
        reply.request_id: reply.probabilities.tolist() for reply in replies if isinstance(reply, PredictReply)
    }
    with running_stack.operator() as operator:
        for client_id, _, _ in clients:
            assert operator.verify_history(client_id)["ok"]
            records = operator.all_queries(client_id)
            # Each client's history holds exactly its own requests' rows, as answered, bit for bit.
            assert {record["request_id"] for record in records} <= set(answered)
            for record in records:
                assert record["probabilities"] == answered[record["request_id"]][record["row_index"]]


def test_with_no_job_in_flight_a_request_leaves_at_once_and_the_window_batches_the_rest(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, _, _ = running_stack.new_client("eager")
    # Alone, with a 2 s window: answered long before the window would have let it go.
    began = time.monotonic()
    replies, jobs = asyncio.run(
        _dispatch(running_stack, small_model.name, [(client_id, small_model.X[:1])], window=2.0, eager_jobs=1)
    )
    assert time.monotonic() - began < 2.0
    assert jobs == 1
    assert isinstance(replies[0], PredictReply)
    # Six at once: the first finds nothing in flight and leaves alone; the other five wait for the
    # window together (one job in flight) and leave as one job.
    requests = [(client_id, small_model.X[index : index + 2]) for index in range(6)]
    replies, jobs = asyncio.run(
        _dispatch(running_stack, small_model.name, requests, window=0.3, eager_jobs=1)
    )
    assert jobs == 2
    assert all(isinstance(reply, PredictReply) and reply.ok for reply in replies)
    wait_until(lambda: running_stack.query_count(client_id) == 13, 30, "the 13 rows stored", interval=0.5)


def test_a_lone_request_leaves_at_once_and_a_burst_still_coalesces(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, _, _ = running_stack.new_client("lone")
    # Nothing in flight, nothing coalescing: a lone request leaves at once, not after its 2 s window.
    began = time.monotonic()
    replies, jobs = asyncio.run(
        _dispatch(
            running_stack, small_model.name, [(client_id, small_model.X[:1])], window=2.0, send_lone=True
        )
    )
    assert time.monotonic() - began < 2.0
    assert (jobs, isinstance(replies[0], PredictReply)) == (1, True)
    # Without the rule the same request waits for its window.
    began = time.monotonic()
    asyncio.run(_dispatch(running_stack, small_model.name, [(client_id, small_model.X[1:2])], window=0.5))
    assert time.monotonic() - began >= 0.5
    # A burst of six: the first leaves alone, the other five find its job in flight and leave together
    # after their window (and their job of five would keep the window for the next request).
    requests = [(client_id, small_model.X[index : index + 2]) for index in range(6)]
    replies, jobs = asyncio.run(
        _dispatch(running_stack, small_model.name, requests, window=0.3, send_lone=True)
    )
    assert jobs == 2
    assert all(isinstance(reply, PredictReply) and reply.ok for reply in replies)
    wait_until(lambda: running_stack.query_count(client_id) == 14, 30, "the 14 rows stored", interval=0.5)


async def _on_side_database(
    running_stack: RunningStack,
    model_name: str,
    rows: np.ndarray,
    waiting_jobs: list[bytes],
    max_backlog: int,
    backlog: int | None = None,
) -> tuple[BaseException, list[bytes]]:
    """One request through a Dispatcher whose Redis client and Celery broker are database 15 of the
    stack's Redis (no worker consumes it), its inference queue holding `waiting_jobs` first; the
    request's error (503 if refused, 504 once its timeout passes) and what the queue then holds."""
    main_url = GatewaySettings(redis_url=running_stack.stack.redis_url).require_redis_url()
    side = GatewaySettings(redis_url=side_redis_url(running_stack))
    main = aioredis.Redis.from_url(main_url)
    side_redis = aioredis.Redis.from_url(side.require_redis_url())
    await side_redis.delete(QUEUE_INFERENCE)
    if waiting_jobs:
        await side_redis.rpush(QUEUE_INFERENCE, *waiting_jobs)
    celery = create_celery_app(side, main="test-side-database")
    dispatcher = Dispatcher(celery, side_redis, timeout=0.5, max_backlog=max_backlog, window=0.01)
    await dispatcher.start()
    try:
        model = await deployed_model(main, model_name)
        if backlog is None:
            backlog = await side_redis.llen(QUEUE_INFERENCE)  # as the API reads it with the key
        with pytest.raises(ApiError) as failed:
            await dispatcher.predict(ClientIdentity(client_id=1, name="side"), model, rows, backlog)
        assert dispatcher.jobs_in_flight == 0
        return failed.value, [bytes(job) for job in await side_redis.lrange(QUEUE_INFERENCE, 0, -1)]
    finally:
        await dispatcher.stop()
        await side_redis.delete(QUEUE_INFERENCE)
        await side_redis.aclose()
        await main.aclose()
        celery.close()


def test_a_full_inference_queue_answers_503_with_retry_after(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    waiting = [b"waiting job", b"another"]
    error, queued = asyncio.run(
        _on_side_database(running_stack, small_model.name, small_model.X[:1], waiting, max_backlog=2)
    )
    assert isinstance(error, ApiError)
    assert error.status_code == 503
    assert "inference queue is full (2 jobs waiting)" in error.message
    assert error.headers == {"Retry-After": "1"}
    assert queued == waiting  # nothing enqueued


def test_the_queue_length_read_with_the_api_key_decides_the_503(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """The API reads the inference queue's length in the round trip that looks up the key and the
    model, and the dispatcher refuses on that figure without asking Redis again."""
    main_url = GatewaySettings(redis_url=running_stack.stack.redis_url).require_redis_url()

    async def lookup() -> tuple[ClientIdentity, DeployedModel, int]:
        main = aioredis.Redis.from_url(main_url)
        side = aioredis.Redis.from_url(side_redis_url(running_stack))
        try:
            await side.delete(REDIS_API_KEYS, REDIS_MODELS, QUEUE_INFERENCE)
            await side.hset(REDIS_MODELS, small_model.name, await main.hget(REDIS_MODELS, small_model.name))
            await side.hset(REDIS_API_KEYS, hash_api_key("mp_side_key"), '{"client_id": 7, "name": "side"}')
            await side.rpush(QUEUE_INFERENCE, b"one", b"two", b"three")
            return await client_and_model(side, "Bearer mp_side_key", small_model.name)
        finally:
            await side.delete(REDIS_API_KEYS, REDIS_MODELS, QUEUE_INFERENCE)
            await side.aclose()
            await main.aclose()

    client, model, backlog = asyncio.run(lookup())
    assert (client.client_id, model.name, backlog) == (7, small_model.name, 3)
    # The queue the dispatcher would read is empty: the 503 comes from the figure passed in.
    error, queued = asyncio.run(
        _on_side_database(running_stack, small_model.name, small_model.X[:1], [], max_backlog=2, backlog=5)
    )
    assert isinstance(error, ApiError)
    assert error.status_code == 503
    assert "(5 jobs waiting)" in error.message
    assert queued == []


def test_job_messages_summarise_their_arguments_without_the_rows(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """Celery puts a repr of a task's arguments in its message headers (shown by `celery inspect`,
    events and monitors); the gateway gives a summary instead of the clients' rows."""
    rows = np.full((2, small_model.X.shape[1]), 0.123456789)
    error, queued = asyncio.run(_on_side_database(running_stack, small_model.name, rows, [], max_backlog=10))
    assert isinstance(error, ApiError)
    assert error.status_code == 504  # no worker
    assert len(queued) == 1
    headers = json.loads(queued[0])["headers"]
    assert headers["task"] == "inference.predict"
    assert headers["argsrepr"] == "()"
    assert headers["kwargsrepr"].endswith(": 1 requests, 2 rows}")
    assert "0.123" not in json.dumps(headers)


def test_a_bad_request_in_a_job_fails_alone(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, _, _ = running_stack.new_client("batched-bad")
    good = small_model.X[:2]
    wrong_width = np.zeros((1, small_model.X.shape[1] + 1))
    no_rows = np.zeros((0, small_model.X.shape[1]))  # the gateway refuses these; the worker too
    requests = [(client_id, good), (client_id, wrong_width), (client_id, no_rows)]
    replies, jobs = asyncio.run(_dispatch(running_stack, small_model.name, requests, window=0.3))
    assert jobs == 1
    assert isinstance(replies[0], PredictReply)
    assert len(replies[0].probabilities) == 2
    for refused in replies[1:]:
        assert isinstance(refused, ApiError)
        assert refused.status_code == 422
    wait_until(lambda: running_stack.query_count(client_id) == 2, 30, "the two good rows recorded", 0.5)


def test_a_full_job_leaves_before_its_window_ends(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, _, _ = running_stack.new_client("batched-full")
    requests = [(client_id, small_model.X[6 * index : 6 * index + 6]) for index in range(3)]
    replies, jobs = asyncio.run(
        _dispatch(running_stack, small_model.name, requests, window=0.3, max_job_rows=10)
    )
    assert jobs == 3  # 6 + 6 rows would exceed 10: each request travels alone
    assert [len(reply.label_indices) for reply in replies if isinstance(reply, PredictReply)] == [6, 6, 6]


def test_admission_control_paces_requests_while_the_audit_trail_is_behind(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """A reported lag above the target paces intake (here 20 rows/s: one 2-row request per 0.1 s tick
    at most); nothing is lost or refused, and once the report is withdrawn (and the real workers'
    reports are older than the gateway's 2 s horizon) requests coalesce again.
    """
    client_id, _, _ = running_stack.new_client("admission")
    requests = [(client_id, small_model.X[index : index + 2]) for index in range(0, 8, 2)]
    report_field = "test-admission:1"

    async def scenario() -> tuple[int, float, int]:
        settings = GatewaySettings(redis_url=running_stack.stack.redis_url)
        redis_client = aioredis.Redis.from_url(settings.require_redis_url())
        celery = create_celery_app(settings, main="test-admission")
        admission = AdmissionControl(target=2.0, tick=0.1, min_rate=20.0)
        dispatcher = Dispatcher(
            celery, redis_client, timeout=30, max_backlog=5000, window=0.01, admission=admission
        )
        await redis_client.hset(REDIS_AUDIT_LAG, report_field, f"30.000 {time.time():.3f}")
        await dispatcher.start()
        try:
            model = await deployed_model(redis_client, small_model.name)
            await async_wait_until(lambda: admission.rate is not None, 4, "the gateway pacing its intake")
            assert admission.lag == 30.0
            assert admission.rate == 20.0  # nothing was let in lately: the floor
            started = time.monotonic()
            paced = await _predict_all(dispatcher, model, requests)
            paced_seconds = time.monotonic() - started
            assert all(isinstance(reply, PredictReply) and reply.ok for reply in paced)
            jobs_while_behind = dispatcher.jobs_sent
            await redis_client.hdel(REDIS_AUDIT_LAG, report_field)
            await async_wait_until(lambda: admission.rate is None, 10, "the pacing lifted")
            released = await _predict_all(dispatcher, model, requests)
            assert all(isinstance(reply, PredictReply) and reply.ok for reply in released)
            return jobs_while_behind, paced_seconds, dispatcher.jobs_sent - jobs_while_behind
        finally:
            await redis_client.hdel(REDIS_AUDIT_LAG, report_field)
            await dispatcher.stop()
            await redis_client.aclose()
            celery.close()

    jobs_while_behind, paced_seconds, jobs_after = asyncio.run(scenario())
    assert jobs_while_behind == len(requests)  # one per tick, although all arrived together
    assert paced_seconds >= 0.3  # 8 rows at 20 rows/s: at least three ticks apart
    assert jobs_after == 1  # coalesced again
    wait_until(
        lambda: running_stack.query_count(client_id) == 2 * 8, 30, "every answered row reaches the audit"
    )
    # The audit worker that stored them reported its own lag (answer to commit) for the gateways.
    reports = redis.Redis.from_url(running_stack.stack.redis_url or "").hgetall(REDIS_AUDIT_LAG)
    lag = audit_lag(reports, time.time(), max_age=30.0)
    assert lag is not None
    assert 0.0 <= lag < 30.0
