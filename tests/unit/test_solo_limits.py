"""Time limits of solo-pool workers (shared/solo_limits.py): soft raises in the task, hard ends it all."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun

from shared.solo_limits import HARD_LIMIT_EXIT_CODE, SoloTimeLimits, enforce_time_limits, task_limits
from tests.conftest import wait_until


@pytest.fixture
def limits() -> Iterator[tuple[SoloTimeLimits, list[int]]]:
    """Limits whose hard limit records the exit code instead of ending the test process."""
    exits: list[int] = []
    previous = signal.getsignal(signal.SIGALRM)
    limits = SoloTimeLimits(exit_process=exits.append)
    limits.start()
    try:
        yield limits, exits
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_soft_limit_interrupts_a_blocked_task(limits: tuple[SoloTimeLimits, list[int]]) -> None:
    solo, exits = limits
    started = time.monotonic()
    solo.task_started("t1", "demo.sleep", soft=0.2, hard=None)
    with pytest.raises(SoftTimeLimitExceeded, match="demo.sleep"):
        time.sleep(5)  # deliberate: the blocked task that the soft limit must interrupt at 0.2 s
    solo.task_finished("t1")
    assert 0.15 < time.monotonic() - started < 2
    assert exits == []


def test_a_finished_task_leaves_no_timer_behind(limits: tuple[SoloTimeLimits, list[int]]) -> None:
    solo, exits = limits
    solo.task_started("t1", "demo.quick", soft=0.2, hard=0.3)
    solo.task_finished("t1")
    time.sleep(0.6)  # neither limit fires for a task that is over
    assert exits == []
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_hard_limit_ends_the_process_and_names_the_task(
    limits: tuple[SoloTimeLimits, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    solo, exits = limits
    started = time.monotonic()
    solo.task_started("t1", "demo.stuck", soft=None, hard=0.3)
    wait_until(lambda: exits, 5, "the hard limit to end the process", interval=0.01)
    assert exits == [HARD_LIMIT_EXIT_CODE]
    assert 0.25 < time.monotonic() - started < 3
    [record] = [record for record in caplog.records if record.name == "shared.solo_limits"]
    assert record.levelname == "CRITICAL"
    assert record.task == "demo.stuck"  # type: ignore[attr-defined]
    assert record.task_id == "t1"  # type: ignore[attr-defined]
    # The next task is watched afresh.
    solo.task_started("t2", "demo.next", soft=None, hard=10)
    solo.task_finished("t2")
    time.sleep(0.1)  # deliberate: a stretch in which nothing may fire again (no event to wait for)
    assert exits == [HARD_LIMIT_EXIT_CODE]


def test_the_limits_come_from_the_call_then_the_task_then_the_app() -> None:
    app = Celery("limits-test", set_as_current=False)
    app.conf.task_soft_time_limit = 120
    app.conf.task_time_limit = 180

    @app.task(name="demo.default")
    def default_task() -> None: ...

    @app.task(name="demo.own", soft_time_limit=5, time_limit=8)
    def own_task() -> None: ...

    assert task_limits(default_task) == (120.0, 180.0)
    assert task_limits(own_task) == (5.0, 8.0)
    own_task.push_request(timelimit=(3, 2))
    try:
        assert task_limits(own_task) == (2.0, 3.0)
    finally:
        own_task.pop_request()
    unlimited = Celery("no-limits-test", set_as_current=False)

    @unlimited.task(name="demo.unlimited")
    def unlimited_task() -> None: ...

    assert task_limits(unlimited_task) == (None, None)


def test_a_real_process_over_its_hard_limit_exits_and_says_why() -> None:
    """Through Celery's own task signals, in a process of its own: what a solo worker does."""
    script = textwrap.dedent(
        """
        import logging, sys, time
        from celery import Celery
        from celery.exceptions import SoftTimeLimitExceeded
        from celery.signals import task_prerun
        from shared.solo_limits import enforce_time_limits

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s %(task)s")
        app = Celery("stuck", set_as_current=False)

        @app.task(name="demo.stuck", soft_time_limit=0.2, time_limit=0.6)
        def stuck() -> None: ...

        enforce_time_limits()
        task_prerun.send(sender=stuck, task_id="job-1", task=stuck, args=(), kwargs={})
        try:
            time.sleep(10)  # deliberate: the blocked task that the soft limit must interrupt
        except SoftTimeLimitExceeded:
            print("soft limit reached", flush=True)
        time.sleep(10)  # a task that ignores its soft limit
        print("not stopped", flush=True)
        """
    )
    started = time.monotonic()
    done = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == HARD_LIMIT_EXIT_CODE, done.stderr
    assert 0.5 < time.monotonic() - started < 8
    assert done.stdout.splitlines() == ["soft limit reached"]
    assert "CRITICAL task exceeded its hard time limit" in done.stderr
    assert "demo.stuck" in done.stderr


def test_celery_task_signals_start_and_stop_the_timers() -> None:
    app = Celery("signals-test", set_as_current=False)

    @app.task(name="demo.signalled", soft_time_limit=0.2, time_limit=30)
    def signalled() -> None: ...

    previous = signal.getsignal(signal.SIGALRM)
    limits = enforce_time_limits()
    try:
        assert threading.main_thread() is threading.current_thread()
        task_prerun.send(sender=signalled, task_id="job-2", task=signalled, args=(), kwargs={})
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.2
        task_postrun.send(sender=signalled, task_id="job-2", task=signalled, args=(), kwargs={})
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        task_prerun.disconnect(limits.on_task_prerun)
        task_postrun.disconnect(limits.on_task_postrun)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
