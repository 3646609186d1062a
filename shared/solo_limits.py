"""Task time limits for workers with the solo pool, where Celery enforces none.

Celery enforces `task_soft_time_limit` and `task_time_limit` only in prefork pool children (the parent
signals an overrunning child, then kills it). A solo worker runs each task in its own main thread, so
it gets the limits here:

- soft: a SIGALRM timer raises `SoftTimeLimitExceeded` inside the task (a blocking socket read is
  interrupted too), which then fails or retries like any other exception;
- hard: a watchdog thread ends the process (exit code `HARD_LIMIT_EXIT_CODE`) when a task still runs at
  its hard limit, as the prefork parent kills its child. The supervisor (`modelprint up`, or compose's
  restart policy) starts a new worker, and the task's message, unacknowledged (late ack), goes back to
  the queue after the broker's visibility timeout.

The watchdog is not told when a task starts or ends: it looks at the running task at least every
`WATCH_INTERVAL_SECONDS` and at its deadline, so a hard limit fires at most that late. An earlier
version woke it through a condition variable at every start and end, and at 200 jobs/s the wake-ups
(two thread switches and a GIL hand-over per task) were about a fifteenth of an inference worker's CPU.

The limits are the task's own (per call, then per task), else the app's defaults.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun

logger = logging.getLogger(__name__)

HARD_LIMIT_EXIT_CODE = 70  # EX_SOFTWARE
WATCH_INTERVAL_SECONDS = 0.25


@dataclass(frozen=True)
class _Running:
    task_id: str
    name: str
    hard_limit: float
    deadline: float  # time.monotonic()


def task_limits(task: Task) -> tuple[float | None, float | None]:
    """(soft, hard) seconds for a task about to run: the call's, else the task's, else the app's."""
    hard_call, soft_call = getattr(task.request, "timelimit", None) or (None, None)
    conf = task.app.conf
    soft = soft_call or task.soft_time_limit or conf.task_soft_time_limit
    hard = hard_call or task.time_limit or conf.task_time_limit
    return (float(soft) if soft else None, float(hard) if hard else None)


class SoloTimeLimits:
    """The soft timer and the hard-limit watchdog of one solo worker process."""

    def __init__(self, exit_process: Callable[[int], Any] = os._exit) -> None:
        self._exit = exit_process
        # Written by the task's thread, read by the watchdog: one attribute, replaced whole.
        self._running: _Running | None = None
        self._soft_task: str | None = None
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Install the SIGALRM handler (from the main thread) and start the watchdog."""
        signal.signal(signal.SIGALRM, self._on_alarm)
        self._watchdog = threading.Thread(target=self._watch, name="solo-time-limits", daemon=True)
        self._watchdog.start()

    def task_started(self, task_id: str, name: str, soft: float | None, hard: float | None) -> None:
        if soft:
            self._soft_task = name
            signal.setitimer(signal.ITIMER_REAL, soft)
        self._running = _Running(task_id, name, hard, time.monotonic() + hard) if hard else None

    def task_finished(self, task_id: str) -> None:
        self._soft_task = None  # first: an alarm already pending now finds no task to stop
        signal.setitimer(signal.ITIMER_REAL, 0)
        running = self._running
        if running is not None and running.task_id == task_id:
            self._running = None

    def on_task_prerun(self, task_id: str, task: Task, **_: Any) -> None:
        """Receiver of Celery's `task_prerun`."""
        self.task_started(task_id, task.name, *task_limits(task))

    def on_task_postrun(self, task_id: str, **_: Any) -> None:
        """Receiver of Celery's `task_postrun`."""
        self.task_finished(task_id)

    def _on_alarm(self, _signum: int, _frame: FrameType | None) -> None:
        name, self._soft_task = self._soft_task, None
        if name is not None:  # not a late alarm of a task that has just finished
            raise SoftTimeLimitExceeded(f"task {name} exceeded its soft time limit")

    def _watch(self) -> None:
        while True:
            running = self._running
            left = WATCH_INTERVAL_SECONDS if running is None else running.deadline - time.monotonic()
            if left > 0:
                time.sleep(min(left, WATCH_INTERVAL_SECONDS))
                continue
            if running is None or self._running is not running:  # it finished just now
                continue
            logger.critical(
                "task exceeded its hard time limit; ending the worker so that it is restarted",
                extra={"task": running.name, "task_id": running.task_id, "limit_s": running.hard_limit},
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            self._running = None
            self._exit(HARD_LIMIT_EXIT_CODE)


def enforce_time_limits() -> SoloTimeLimits:
    """Give the tasks this (solo) worker process runs their time limits. Call from the main thread."""
    limits = SoloTimeLimits()
    limits.start()
    task_prerun.connect(limits.on_task_prerun, weak=False)
    task_postrun.connect(limits.on_task_postrun, weak=False)
    return limits
