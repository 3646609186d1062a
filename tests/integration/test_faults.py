"""Faults against the real stack: a killed worker, a restarted PostgreSQL or Redis, a stalled worker.

Each test leaves the stack as it found it. The promise under test: an answered query is never lost
from the audit history and never stored twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import text

from shared import audit_outbox
from shared.celery_app import create_celery_app
from shared.db import session_scope
from shared.names import (
    QUEUE_AUDIT,
    QUEUE_INFERENCE,
    REDIS_AUDIT_OUTBOX,
    REDIS_AUDIT_OUTBOX_INDEX,
    REDIS_AUDIT_OUTBOX_REJECTED,
    REDIS_SCORING_PENDING_PREFIX,
    TASK_DRAIN_AUDIT,
    TASK_PREDICT,
    TASK_RECORD_QUERIES,
)
from tests.conftest import (
    TEST_PREDICT_TIMEOUT,
    TEST_VISIBILITY_TIMEOUT,
    DeployedTestModel,
    RunningStack,
    wait_until,
)

pytestmark = pytest.mark.integration


def _answered_rows(
    running_stack: RunningStack, model: DeployedTestModel, requests: int, rows: int
) -> tuple[int, int]:
    """Send `requests` requests of `rows` rows from a new client; return (client id, rows answered)."""
    client_id, gateway, _ = running_stack.new_client("fault")
    answered = 0
    with gateway:
        for index in range(requests):
            batch = model.X[(index * rows) % 500 : (index * rows) % 500 + rows]
            answer = gateway.predict(model.name, batch.tolist())
            answered += len(answer["predictions"])
    return client_id, answered


def _stored_ids(running_stack: RunningStack, client_id: int) -> list[tuple[str, int]]:
    with running_stack.operator() as operator:
        return [(record["request_id"], record["row_index"]) for record in operator.all_queries(client_id)]


def _stored_once(
    running_stack: RunningStack, client_id: int, rows: int, message: str, timeout: float = 60
) -> None:
    """Wait until the client's `rows` answered rows are stored; check that none is stored twice."""
    stored = wait_until(
        lambda: (ids := _stored_ids(running_stack, client_id)) and len(ids) >= rows and ids,
        timeout=timeout,
        message=message,
        interval=0.5,
    )
    assert len(set(stored)) == len(stored) == rows


def _drain_tasks(broker: redis.Redis) -> list[bytes]:
    """Drain tasks waiting on the audit queue (beat's periodic jobs share the queue)."""
    return [
        message
        for message in broker.lrange(QUEUE_AUDIT, 0, -1)
        if json.loads(message)["headers"]["task"] == TASK_DRAIN_AUDIT
    ]


def _storing_tasks_outstanding(broker: redis.Redis) -> set[str]:
    """Ids of the audit tasks that store rows and are queued, or delivered and not yet acknowledged.

    A delivered task stays in kombu's "unacked" hash until its worker acknowledges it after running
    (late acks); a killed worker's stay there until the visibility timeout returns them to the queue.
    """
    with broker.pipeline(transaction=True) as pipe:  # the queue and the hash as of one moment
        pipe.lrange(QUEUE_AUDIT, 0, -1)
        pipe.hvals("unacked")
        queued, unacked = pipe.execute()
    messages = [json.loads(message) for message in queued] + [json.loads(entry)[0] for entry in unacked]
    return {
        message["headers"]["id"]
        for message in messages
        if message.get("headers", {}).get("task") in (TASK_DRAIN_AUDIT, TASK_RECORD_QUERIES)
    }


def _have_run(broker: redis.Redis, task_ids: set[str]) -> Callable[[], bool]:
    """A condition: none of these tasks is queued or unacknowledged, at two polls in a row (a message
    that a worker has taken off the queue and not yet entered in "unacked" is briefly in neither)."""
    clear_before = False

    def condition() -> bool:
        nonlocal clear_before
        clear = not task_ids & _storing_tasks_outstanding(broker)
        settled, clear_before = clear_before and clear, clear
        return settled

    return condition


def _claimed(broker: redis.Redis) -> int:
    """Outbox messages a drain holds (their claimable time pushed into the future)."""
    seconds, microseconds = broker.time()
    return int(broker.zcount(REDIS_AUDIT_OUTBOX_INDEX, f"({seconds + microseconds / 1e6}", "+inf"))


def test_killed_audit_worker_loses_and_doubles_nothing(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    stack = running_stack.stack
    broker = redis.Redis.from_url(stack.redis_url or "")
    stack.kill_service("audit-worker", signal.SIGKILL)
    client_id, answered = _answered_rows(running_stack, small_model, requests=60, rows=5)
    assert answered == 300
    assert audit_outbox.pending(broker) == 60  # every answered request waits durably in Redis
    assert _drain_tasks(broker)  # and the auditor is asked to drain them
    # Start a worker and kill it again while it stores: holding a claim, or after a first commit.
    stack.restart_service("audit-worker")
    wait_until(
        lambda: _claimed(broker) or audit_outbox.pending(broker) < 60,
        30,
        "the new audit worker to start storing",
        0.005,
    )
    stack.kill_service("audit-worker", signal.SIGKILL)
    outstanding = _storing_tasks_outstanding(broker)  # queued, or held by the killed workers
    stack.restart_service("audit-worker")
    _stored_once(running_stack, client_id, 300, "all 300 answered rows stored after the worker was killed")
    wait_until(lambda: audit_outbox.pending(broker) == 0, 30, "the outbox emptied once all is stored")
    # The tasks the killed workers held return to the queue after the visibility timeout and run
    # again: wait until every one outstanding at the kill has run and been acknowledged.
    wait_until(
        _have_run(broker, outstanding),
        6 * TEST_VISIBILITY_TIMEOUT,
        f"the {len(outstanding)} storing tasks outstanding at the kill redelivered and run",
        0.2,
    )
    stored = _stored_ids(running_stack, client_id)
    assert len(stored) == 300
    assert len(set(stored)) == 300
    broker.close()


def test_lost_drain_tasks_are_replaced(running_stack: RunningStack, small_model: DeployedTestModel) -> None:
    """The broker loses the drain tasks (as kombu's Redis transport does when a worker dies between
    taking a message off the queue and recording it as unacknowledged): the rows, kept in the outbox,
    are stored anyway once the "drain queued" flag expires (beat queues a drain)."""
    stack = running_stack.stack
    broker = redis.Redis.from_url(stack.redis_url or "")
    stack.kill_service("audit-worker", signal.SIGKILL)
    try:
        client_id, answered = _answered_rows(running_stack, small_model, requests=10, rows=3)
        assert answered == 30
        assert audit_outbox.pending(broker) >= 10  # each kept until its rows are committed
        lost = _drain_tasks(broker)
        assert lost
        assert sum(broker.lrem(QUEUE_AUDIT, 1, message) for message in lost) == len(lost)
    finally:
        stack.restart_service("audit-worker")
    _stored_once(running_stack, client_id, 30, "the 30 rows stored although every drain task was lost")
    wait_until(lambda: audit_outbox.pending(broker) == 0, 30, "the outbox emptied once all is stored")
    broker.close()


def test_a_burst_is_stored_several_jobs_per_transaction(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """40 single-row requests waiting while the audit worker is down go in ceil(40 / 16) transactions
    (the test stack drains 16 messages per transaction): PostgreSQL's xmin tells the transactions."""
    stack = running_stack.stack
    stack.kill_service("audit-worker", signal.SIGKILL)
    try:
        client_id, answered = _answered_rows(running_stack, small_model, requests=40, rows=1)
        assert answered == 40
    finally:
        stack.restart_service("audit-worker")
    _stored_once(running_stack, client_id, 40, "the burst stored")
    with session_scope(stack.database_url or "") as session:
        transactions = session.execute(
            text("SELECT count(DISTINCT xmin::text) FROM query_requests WHERE client_id = :c"),
            {"c": client_id},
        ).scalar_one()
    assert transactions == 3


def test_postgres_restart_delays_but_loses_no_record(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    postgres = running_stack.stack.postgres
    if postgres is None:
        pytest.fail("this test restarts the embedded PostgreSQL; unset MODELPRINT_DATABASE_URL to run it")
    # Warm the inference worker's model cache (answers need no database) and create the client first.
    _answered_rows(running_stack, small_model, requests=4, rows=1)
    client_id, gateway, _ = running_stack.new_client("pg-restart")
    postgres.stop()
    answered = 0
    with gateway:
        for index in range(20):
            answer = gateway.predict(small_model.name, small_model.X[index * 3 : index * 3 + 3].tolist())
            answered += len(answer["predictions"])
    assert answered == 60
    postgres.start()
    _stored_once(running_stack, client_id, 60, "the 60 rows answered while PostgreSQL was down", timeout=90)


def test_redis_restart_keeps_queued_audit_messages(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    embedded_redis = running_stack.stack.redis
    if embedded_redis is None:
        pytest.fail("this test restarts the embedded Redis; unset MODELPRINT_REDIS_URL to run it")
    stack = running_stack.stack
    stack.kill_service("audit-worker", signal.SIGKILL)
    client_id, answered = _answered_rows(running_stack, small_model, requests=10, rows=4)
    assert answered == 40
    embedded_redis.stop()
    embedded_redis.start()
    stack.restart_service("audit-worker")
    # A worker that holds an unacknowledged message (a retry or a delayed scoring waiting for its
    # time) when Redis goes away exits with kombu's "'NoneType' object has no attribute 'hostname'"
    # while it restores them; the message is not lost (it returns to its queue after the visibility
    # timeout). `modelprint up` and compose restart the worker; here the test does what they do.
    # That happens when the worker notices the lost connection, before it reconnects: wait until it
    # has exited, or answers a ping through the new Redis (it is past that point).
    scoring_worker = stack.service("scoring-worker")
    wait_until(
        lambda: scoring_worker.exited() is not None or _answers_ping(running_stack, "scoring"),
        30,
        "the scoring worker exited or reconnected after Redis restarted",
        0.2,
    )
    if scoring_worker.exited() is not None:
        stack.restart_service("scoring-worker")
    _stored_once(running_stack, client_id, 40, "the 40 rows queued before Redis restarted")
    # The gateway and the inference worker reconnect by themselves.
    _, gateway, _ = running_stack.new_client("after-redis")
    with gateway:
        answer = wait_until(
            lambda: _try_predict(gateway, small_model),
            timeout=60,
            message="a prediction after Redis restarted",
        )
    assert len(answer["predictions"]) == 2


def _answers_ping(running_stack: RunningStack, worker: str) -> bool:
    """Whether the Celery worker named `worker@<host>` answers a ping now."""
    settings = running_stack.settings.model_copy(update={"redis_url": running_stack.stack.redis_url})
    node = f"{worker}@{socket.gethostname()}"
    celery = create_celery_app(settings, main="test-ping")
    try:
        return bool(celery.control.ping(destination=[node], timeout=1.0, limit=1))
    except (KombuOperationalError, redis.ConnectionError):
        return False
    finally:
        celery.close()


def _expired_jobs_discarded(running_stack: RunningStack, log_offsets: dict[str, int]) -> int:
    """Inference jobs discarded as expired since the offsets of the workers' logs (Celery logs each)."""
    discarded = 0
    for name, offset in log_offsets.items():
        with running_stack.stack.service(name).log_path.open("rb") as log:
            log.seek(offset)
            discarded += log.read().count(f"Discarding revoked task: {TASK_PREDICT}[".encode())
    return discarded


def _try_predict(gateway: object, model: DeployedTestModel) -> dict[str, object] | None:
    try:
        return gateway.predict(model.name, model.X[:2].tolist())  # type: ignore[attr-defined,no-any-return]
    except Exception:
        return None


def test_stalled_inference_workers_give_504_and_the_stale_job_is_discarded(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    stack = running_stack.stack
    workers = [service.name for service in stack.services if service.name.startswith("inference-worker")]
    assert len(workers) == stack.options.inference_workers >= 2
    client_id, gateway, api_key = running_stack.new_client("stall")
    log_offsets = {name: stack.service(name).log_path.stat().st_size for name in workers}
    for name in workers:
        stack.kill_service(name, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = httpx.post(
            f"{running_stack.settings.gateway_url}/v1/models/{small_model.name}/predict",
            json={"instances": small_model.X[:1].tolist()},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # past the job's expiry (sent a window after the request arrived)
    finally:
        for name in workers:
            stack.kill_service(name, signal.SIGCONT)
    assert response.status_code == 504
    assert "no inference worker answered" in response.json()["error"]
    assert TEST_PREDICT_TIMEOUT - 0.5 < elapsed < TEST_PREDICT_TIMEOUT + 5
    with gateway:
        answer = gateway.predict(small_model.name, small_model.X[:3].tolist())
    assert np.array(answer["predictions"][0]["probabilities"]).shape == (3,)
    # The job that timed out is not run once the workers resume: only the answered rows are stored.
    _stored_once(running_stack, client_id, 3, "the 3 answered rows stored")
    wait_until(
        lambda: _expired_jobs_discarded(running_stack, log_offsets) >= 1,
        30,
        "the worker that takes the timed-out job discarding it as expired",
    )
    assert len(_stored_ids(running_stack, client_id)) == 3


def _scoring_waits_then_runs(
    running_stack: RunningStack,
    model: DeployedTestModel,
    hold: Callable[[], Any],
    release: Callable[[], Any],
    requests: int,
    settle: float,
    while_held: str,
) -> None:
    """Answer `requests` requests of 40 rows while `hold()` holds: the rows are stored at once, and
    `settle` s later their scoring is still queued (its mark stays until a job starts scoring) with no
    score; after `release()` the client is scored over every row."""
    broker = redis.Redis.from_url(running_stack.stack.redis_url or "")
    hold()
    try:
        client_id, answered = _answered_rows(running_stack, model, requests=requests, rows=40)
        wait_until(
            lambda: running_stack.query_count(client_id) == answered,
            timeout=20,
            message=f"rows stored while {while_held}",
        )
        time.sleep(settle)
        assert broker.exists(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}")
        with running_stack.operator() as operator:
            assert operator.suspicion(client_id)["models"] == {}
    finally:
        release()
        broker.close()
    with running_stack.operator() as operator:
        scored = wait_until(
            lambda: operator.suspicion(client_id)["models"].get(model.name),
            timeout=60,
            message=f"the client scored once no longer held ({while_held})",
        )
    assert {entry["queries_seen"] for entry in scored} == {answered}


def test_stalled_scoring_worker_does_not_delay_storing(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """Scoring runs on its own queue and worker: with that worker frozen, answered rows are still stored
    at once, the scoring waits on its queue, and it runs when the worker is back. 160 rows cross the
    test stack's scoring step (50) three times; the triggers coalesce into one waiting job."""
    stack = running_stack.stack
    _scoring_waits_then_runs(
        running_stack,
        small_model,
        hold=lambda: stack.kill_service("scoring-worker", signal.SIGSTOP),
        release=lambda: stack.kill_service("scoring-worker", signal.SIGCONT),
        requests=4,
        settle=0.0,
        while_held="the scoring worker is stopped",
    )


# A process that keeps one CPU busy for argv[1] seconds.
BURNER = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass"


def test_scoring_yields_to_a_busy_machine_and_runs_when_it_eases(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """With every CPU kept busy by other processes, answered rows are stored at once but their scoring
    waits (the test stack yields above 90% busy, for at most 20 s): 80 rows cross the scoring step, a
    job is queued 1 s later and, 4 s after the rows are stored, is still waiting for the load. Once the
    load stops, it runs."""
    burners: list[subprocess.Popen[bytes]] = []

    def start_burners() -> None:
        for _ in range(os.cpu_count() or 2):
            burners.append(subprocess.Popen([sys.executable, "-c", BURNER, "40"]))  # noqa: S603 - ours

    def stop_burners() -> None:
        for burner in burners:
            burner.kill()
            burner.wait(timeout=10)

    _scoring_waits_then_runs(
        running_stack,
        small_model,
        hold=start_burners,
        release=stop_burners,
        requests=2,
        settle=4.0,
        while_held="every CPU is kept busy",
    )


def test_audit_messages_that_cannot_be_stored_are_moved_aside_and_the_rest_stored(
    running_stack: RunningStack,
) -> None:
    """One drain claims a good message, one that does not parse and one PostgreSQL refuses (its client
    does not exist): the good rows are stored, the other two kept in the rejected hash, none lost."""
    from services.auditor.tasks import app  # its module needs the stack's Redis URL at import

    client_id, _, _ = running_stack.new_client("rejects")
    broker = redis.Redis.from_url(running_stack.stack.redis_url or "")
    names = {kind: f"{kind}-{uuid.uuid4().hex}" for kind in ("good", "unreadable", "refused")}
    good = _query_batch(client_id, names["good"], rows=5)
    refused = _query_batch(2_000_000_000, names["refused"], rows=2)  # no such client: a foreign-key violation
    try:
        audit_outbox.put(broker, names["good"], {"batches": [good]})
        audit_outbox.put(broker, names["unreadable"], {"batches": [{"rows": "not a batch"}]})
        audit_outbox.put(broker, names["refused"], {"batches": [refused]})
        app.send_task(TASK_DRAIN_AUDIT, queue=QUEUE_AUDIT)
        _stored_once(running_stack, client_id, 5, "the good message stored", timeout=30)
        wait_until(
            lambda: (
                set(broker.hkeys(REDIS_AUDIT_OUTBOX_REJECTED))
                >= {names["unreadable"].encode(), names["refused"].encode()}
            ),
            30,
            "the two bad messages moved aside",
        )
        assert not any(broker.hexists(REDIS_AUDIT_OUTBOX, name) for name in names.values())
    finally:
        broker.hdel(REDIS_AUDIT_OUTBOX_REJECTED, names["unreadable"], names["refused"])
        broker.close()


def _query_batch(client_id: int, request_id: str, rows: int) -> dict[str, object]:
    return {
        "request_id": request_id,
        "client_id": client_id,
        "model": "small-mlp",
        "version": 1,
        "scheme": "hmac-second-class",
        "key_id": "k1",
        "answered_at": datetime.now(UTC).isoformat(),
        "inputs": [[float(i)] * 6 for i in range(rows)],
        "probabilities": [[0.2, 0.3, 0.5]] * rows,
        "label_indices": [2] * rows,
        "labels": ["mid"] * rows,
    }


def test_the_default_stack_runs_solo_workers_each_with_its_own_node(running_stack: RunningStack) -> None:
    """The default: one solo-pool process per inference worker (two), a solo audit worker."""
    settings = running_stack.settings.model_copy(update={"redis_url": running_stack.stack.redis_url})

    def worker_stats() -> tuple[dict[str, Any], dict[str, Any]] | None:
        celery = create_celery_app(settings, main="test-pools")
        try:
            inspect = celery.control.inspect(timeout=2.0)
            stats, queues = inspect.stats(), inspect.active_queues()
            return (stats, queues) if stats and queues and len(stats) == len(queues) else None
        except (KombuOperationalError, redis.ConnectionError):
            return None  # kombu's process-wide producer pool may hold a connection from before a restart
        finally:
            celery.close()

    stats, queues = wait_until(worker_stats, timeout=20, message="the workers' stats")
    pools = {node.split("@")[0]: info["pool"]["implementation"] for node, info in stats.items()}
    assert {"inference-0", "inference-1", "audit"} <= pools.keys(), pools
    for node in ("inference-0", "inference-1", "audit"):
        assert pools[node].endswith("solo:TaskPool"), pools
    assert pools["scans"].endswith("prefork:TaskPool")  # a scan's hard time limit stays Celery's own
    # Solo inference workers take jobs without acknowledgements; the other queues keep them.
    no_ack = {
        (node.split("@")[0], queue["name"]): queue["no_ack"]
        for node, consumed in queues.items()
        for queue in consumed
    }
    assert no_ack[("inference-0", QUEUE_INFERENCE)], no_ack
    assert no_ack[("inference-1", QUEUE_INFERENCE)], no_ack
    assert not no_ack[("audit", QUEUE_AUDIT)], no_ack


def test_killed_inference_worker_loses_no_answered_row(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """A solo inference worker SIGKILLed under load: the other answers on; a request whose job died
    with the worker gets a 504, never an answer missing from the audit history."""
    stack = running_stack.stack
    client_id, _, api_key = running_stack.new_client("killed-inference")
    url = f"{running_stack.settings.gateway_url}/v1/models/{small_model.name}/predict"
    statuses: list[int] = []

    def send(index: int) -> int:
        """The rows answered (each sender returns its own: `+=` on a shared count races)."""
        rows = small_model.X[index % 400 : index % 400 + 2].tolist()
        response = httpx.post(
            url, json={"instances": rows}, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
        )
        statuses.append(response.status_code)  # list.append is atomic
        return len(response.json()["predictions"]) if response.status_code == 200 else 0

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(send, index) for index in range(120)]
        wait_until(lambda: len(statuses) >= 20, timeout=30, message="requests answered before the kill")
        stack.kill_service("inference-worker-1", signal.SIGKILL)
        stack.restart_service("inference-worker-1")
        answered = sum(future.result() for future in futures)
    assert set(statuses) <= {200, 504}, statuses
    assert statuses.count(504) <= 4, statuses  # at most the job the killed worker was running
    assert answered == 2 * statuses.count(200)
    _stored_once(running_stack, client_id, answered, "every answered row stored after the kill")
    time.sleep(1.0)  # nothing else arrives later (a killed worker's job is not run again)
    assert len(_stored_ids(running_stack, client_id)) == answered


def test_steady_traffic_keeps_one_drain_at_a_time(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """Under steady traffic the running drain keeps claiming, so jobs answered meanwhile queue no drain
    of their own: no pile of drain tasks builds up on the audit queue (an earlier protocol let every
    claim queue another, thousands a minute at 200 requests/s, ahead of registry syncs and webhooks)."""
    broker = redis.Redis.from_url(running_stack.stack.redis_url or "")
    client_id, _, api_key = running_stack.new_client("steady")
    url = f"{running_stack.settings.gateway_url}/v1/models/{small_model.name}/predict"
    ends = time.monotonic() + 5.0

    def send_until_the_end(offset: int) -> int:
        """The requests this sender had answered (summed after: `+=` on a shared count races)."""
        answered = 0
        with httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http:
            index = offset
            while time.monotonic() < ends:
                rows = small_model.X[index % 500 : index % 500 + 1].tolist()
                response = http.post(url, json={"instances": rows})
                assert response.status_code == 200, response.text
                answered += 1
                index += 4
        return answered

    waiting: list[int] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        senders = [pool.submit(send_until_the_end, offset) for offset in range(4)]
        while not all(sender.done() for sender in senders):
            waiting.append(len(_drain_tasks(broker)))
            time.sleep(0.05)  # deliberate: the period at which the queue is sampled during the load
        answered = sum(sender.result() for sender in senders)
    assert answered >= 100, answered
    assert max(waiting) <= 2, f"drain tasks waiting on the audit queue during the load: {waiting}"
    _stored_once(running_stack, client_id, answered, "every answered row stored")
    wait_until(lambda: not _drain_tasks(broker), 10, "no drain task left waiting once all is stored")
    broker.close()
