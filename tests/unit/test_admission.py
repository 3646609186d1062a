"""The gateway's admission control: the audit lag reports and the pacing of intake."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.service import AdmissionControl, audit_lag
from shared.http import ApiError
from tests.conftest import async_wait_until


def test_audit_lag_takes_the_largest_recent_report() -> None:
    now = 1000.0
    reports = {
        b"host:1": b"0.250 999.5",
        b"host:2": b"3.000 999.0",
        b"host:3": b"40.000 990.0",  # too old: that worker is idle or gone
        b"host:4": b"garbage",
        b"host:5": b"nan 999.9",
    }
    assert audit_lag(reports, now, max_age=2.0) == 3.0
    assert audit_lag({"w": "1.5 1000.0"}, now, max_age=2.0) == 1.5
    assert audit_lag({}, now, max_age=2.0) is None
    assert audit_lag({b"host:3": b"40.000 990.0"}, now, max_age=2.0) is None


def test_rate_falls_when_behind_grows_when_on_time_and_is_lifted() -> None:
    async def scenario() -> None:
        control = AdmissionControl(target=2.0, decrease_interval=1.0)
        control.observe(0.5, now=0.0)
        assert control.rate is None  # on time: not paced
        await control.admit(5000, timeout=1.0)  # 5,000 rows in the next second
        control.observe(5.0, now=1.0)
        assert control.rate == pytest.approx(3500)  # behind: 0.7 x the rows per second let in lately
        control.observe(5.0, now=1.5)
        assert control.rate == pytest.approx(3500)  # at most one decrease per interval
        control.admitted_rows += 1750  # what the rate let in over the last half second
        control.observe(5.0, now=2.0)
        assert control.rate == pytest.approx(0.7 * 3500)
        control.admitted_rows += 1225
        control.observe(1.0, now=2.5)
        assert control.rate == pytest.approx(0.7 * 3500 * 1.05)  # on time: grows per observation
        control.observe(1.0, now=3.0)  # nothing arrived for half a second: far above demand
        assert control.rate is None
        control.admitted_rows += 4000
        control.observe(9.0, now=4.0)
        assert control.rate is not None
        control.observe(None, now=4.25)
        assert control.rate is None  # no recent report: caught up (or down), not paced
        control.admitted_rows += 4000
        control.observe(9.0, now=5.25)
        assert control.rate is not None
        control.observe(0.9, now=5.5)
        assert control.rate is None  # below half the target: caught up, not paced

    asyncio.run(scenario())


def test_paced_requests_are_let_in_together_per_tick() -> None:
    async def scenario() -> None:
        control = AdmissionControl(target=2.0, tick=0.1, min_rate=100.0)
        control.observe(10.0, now=0.0)
        assert control.rate == pytest.approx(100.0)  # nothing measured yet: the floor
        waiting = [asyncio.create_task(control.admit(4, timeout=5.0)) for _ in range(6)]
        await async_wait_until(lambda: len(control._waiting) == 6, 1, "the six requests waiting", 0.001)
        control.release_due()  # one tick: 10 rows of budget
        await async_wait_until(lambda: all(t.done() for t in waiting[:3]), 1, "three let in", 0.001)
        assert [task.done() for task in waiting] == [True, True, True, False, False, False]
        control.release_due()  # the third request overdrew the budget by 2: 8 rows left
        await async_wait_until(lambda: all(t.done() for t in waiting[:5]), 1, "two more let in", 0.001)
        assert [task.done() for task in waiting] == [True, True, True, True, True, False]
        assert control.admitted_rows == 20

    asyncio.run(scenario())


def test_a_request_gets_503_at_its_deadline_and_the_rest_when_lifted() -> None:
    async def scenario() -> None:
        control = AdmissionControl(target=2.0, tick=0.1, min_rate=100.0)
        control.observe(10.0, now=0.0)
        with pytest.raises(ApiError) as refused:
            await control.admit(40, timeout=0.05)  # no tick came
        assert refused.value.status_code == 503
        assert "audit trail is 10.0 s behind" in refused.value.message
        assert refused.value.headers == {"Retry-After": "1"}
        assert control.refused == 1
        waiting = [asyncio.create_task(control.admit(100, timeout=5.0)) for _ in range(5)]
        await asyncio.sleep(0.05)  # deliberate: no tick runs here, so none may be let in meanwhile
        assert not any(task.done() for task in waiting)
        control.observe(None, now=1.0)  # the auditor caught up: everything waiting is let in
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=1.0)
        assert control.admitted_rows == 500
        stopping = ApiError(503, "stopping")
        control.observe(10.0, now=2.0)
        last = asyncio.create_task(control.admit(10, timeout=5.0))
        await async_wait_until(lambda: len(control._waiting) == 1, 1, "the last request waiting", 0.001)
        control.abandon(stopping)
        with pytest.raises(ApiError, match="stopping"):
            await last

    asyncio.run(scenario())
