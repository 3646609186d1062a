"""Celery's own cost per task, with the stack's Celery configuration: the floor under the inference worker.

Starts an embedded Redis and one solo-pool worker (the inference worker's pool and queue settings,
through `shared.celery_app.create_celery_app`) whose only task does nothing, publishes tasks shaped
like inference jobs (a job id, a reply channel, an expiry) at several rates, and prints the worker's
CPU time per task. At low rates each task wakes an idle worker (epoll, BRPOP, the tracer, a new
BRPOP); in a backlog the worker goes from one to the next. Whatever the inference worker spends per
job beyond this is its own task (prediction, fingerprint, outbox). Usage:

    .venv/bin/python -m bench.celery_floor [--tasks 2000] [--rates 200,1000,0]   # 0: a backlog
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis

from shared.celery_app import create_celery_app
from shared.config import Settings
from shared.embedded import EmbeddedRedis, stop_process
from shared.names import QUEUE_INFERENCE

TASK_NAME = "bench.noop"

# The worker side: an app configured as the stack's, with one task that does nothing.
WORKER_APP = """
import os
from shared.celery_app import create_celery_app
from shared.config import Settings
from shared.names import QUEUE_INFERENCE

app = create_celery_app(Settings(redis_url=os.environ["BENCH_REDIS_URL"]), main="bench-floor",
                        no_ack_queues=(QUEUE_INFERENCE,))


@app.task(name="bench.noop")
def noop(**payload):
    return None
"""


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def wait_until_idle(broker: redis.Redis, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while broker.llen(QUEUE_INFERENCE) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the last task runs to its end


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000, help="tasks published per rate")
    parser.add_argument("--rates", default="200,1000,0", help="tasks per second; 0 publishes a backlog")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",") if rate]
    with tempfile.TemporaryDirectory(prefix="modelprint-floor-") as tmp:
        folder = Path(tmp)
        (folder / "floor_app.py").write_text(WORKER_APP)
        server = EmbeddedRedis(folder / "redis")
        url = server.start()
        repo = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": os.pathsep.join([str(folder), repo])}
        worker = subprocess.Popen(  # noqa: S603 - our interpreter and arguments
            [sys.executable, "-m", "celery", "-A", "floor_app", "worker", "-P", "solo", "-Q", QUEUE_INFERENCE,
             "--loglevel", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat"],
            env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        app = create_celery_app(Settings(redis_url=url), main="bench-floor-publisher")
        broker = redis.Redis.from_url(url)
        try:
            process = psutil.Process(worker.pid)
            with app.producer_or_acquire() as producer:
                # Warm-up: the worker is ready once it has run a task.
                app.send_task(TASK_NAME, kwargs={}, queue=QUEUE_INFERENCE, producer=producer)
                wait_until_idle(broker, timeout=60)
                payload = {"job_id": "0" * 32, "reply_to": "modelprint:replies:bench", "requests": []}
                print(f"{'tasks/s':>9} {'tasks':>7} {'worker CPU us/task':>19}")
                for rate in rates:
                    before = cpu_seconds(process)
                    began = time.monotonic()
                    for index in range(args.tasks):
                        app.send_task(
                            TASK_NAME, kwargs=payload, queue=QUEUE_INFERENCE, producer=producer, expires=10
                        )
                        if rate:
                            time.sleep(max(0.0, began + (index + 1) / rate - time.monotonic()))
                    wait_until_idle(broker)
                    used = cpu_seconds(process) - before
                    print(f"{rate or 'backlog':>9} {args.tasks:>7} {used / args.tasks * 1e6:>19.0f}")
        finally:
            broker.close()
            app.close()
            stop_process(worker)
            server.stop()


if __name__ == "__main__":
    main()
