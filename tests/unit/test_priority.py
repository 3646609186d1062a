"""shared/priority.py: the scoring worker's nice value must reach its scheduling group, and its jobs
wait (boundedly) while the machine is busy.

Each case runs in a child process (a fresh one per case: a nice value cannot be lowered again), started
in a session of its own as `modelprint up` starts its services, or in the test's session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.priority import (
    BusyWait,
    CpuTimes,
    autogroup_nice,
    busy_share,
    lower_cpu_priority,
    read_cpu_times,
    wait_while_busy,
)

CHILD = """
import json, sys
from pathlib import Path
from shared.priority import AUTOGROUP, lower_cpu_priority
path = Path(sys.argv[2]) if len(sys.argv) > 2 else AUTOGROUP
outcome = lower_cpu_priority(int(sys.argv[1]), path)
real = AUTOGROUP.read_text().strip() if AUTOGROUP.exists() else None
print(json.dumps({"nice": outcome.nice, "group_nice": outcome.group_nice, "reason": outcome.reason,
                  "file": path.read_text().strip() if path.exists() else None, "real": real}))
"""


def run_child(nice: int, autogroup: Path | None, new_session: bool) -> dict[str, object]:
    argv = [sys.executable, "-c", CHILD, str(nice)] + ([str(autogroup)] if autogroup else [])
    done = subprocess.run(  # noqa: S603 - our own interpreter
        argv, capture_output=True, text=True, check=True, start_new_session=new_session, timeout=60
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    ("group_before", "new_session", "group_after", "file_after"),
    [
        # A session leader (as `modelprint up` starts each service) lowers its group too ...
        (0, True, 10, "10"),
        # ... a worker started from a shell shares the shell's group and leaves it alone ...
        (0, False, None, "/autogroup-42 nice 0"),
        # ... and a group already lower is not raised back.
        (15, True, 15, "/autogroup-42 nice 15"),
    ],
)
def test_the_group_is_lowered_only_by_a_session_leader(
    tmp_path: Path, group_before: int, new_session: bool, group_after: int | None, file_after: str
) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text(f"/autogroup-42 nice {group_before}\n")
    result = run_child(10, autogroup, new_session=new_session)
    assert result["nice"] == 10
    assert result["group_nice"] == group_after
    assert result["file"] == file_after
    if not new_session:
        assert "not a session leader" in str(result["reason"])


def test_without_autogroups_only_the_process_nice_is_set(tmp_path: Path) -> None:
    result = run_child(5, tmp_path / "absent", new_session=True)
    assert result["nice"] == 5
    assert result["group_nice"] is None
    assert "no autogroups" in str(result["reason"])


def test_on_this_kernel() -> None:
    """The real /proc/self/autogroup where the kernel has autogroups; the process nice where not."""
    result = run_child(10, None, new_session=True)
    assert result["nice"] == 10
    if Path("/proc/self/autogroup").exists():
        assert result["group_nice"] == 10, result
        assert str(result["real"]).endswith("nice 10")
    else:
        assert result["group_nice"] is None
        assert "no autogroups" in str(result["reason"])


def test_out_of_range_and_unreadable_values_are_refused() -> None:
    with pytest.raises(ValueError, match="0..19"):
        lower_cpu_priority(20)
    with pytest.raises(ValueError, match="unexpected autogroup line"):
        autogroup_nice("garbage")
    assert autogroup_nice("/autogroup-7 nice -3\n") == -3


# Waiting while the machine is busy ---------------------------------------------------------------


def test_cpu_times_from_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 20 30 400 50 6 7 8 90 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert read_cpu_times(stat) == CpuTimes(total=621, idle=450)
    stat.write_text("intr 1 2 3\n")
    assert read_cpu_times(stat) is None
    assert read_cpu_times(tmp_path / "missing") is None
    assert read_cpu_times() is not None  # this machine's (Linux)


@pytest.mark.parametrize(
    ("before", "after", "share"),
    [
        (CpuTimes(1000, 500), CpuTimes(1200, 600), 0.5),
        (CpuTimes(1000, 500), CpuTimes(1200, 500), 1.0),
        (CpuTimes(1000, 500), CpuTimes(1200, 700), 0.0),
        (CpuTimes(1000, 500), CpuTimes(1000, 500), 0.0),  # no time passed
    ],
)
def test_busy_share(before: CpuTimes, after: CpuTimes, share: float) -> None:
    assert busy_share(before, after) == pytest.approx(share)


class FakeMachine:
    """A clock, a sleep that advances it, and /proc/stat readings whose busy share follows a schedule
    of (until clock time, share)."""

    def __init__(self, schedule: list[tuple[float, float]]) -> None:
        self.now = 1000.0
        self.schedule = schedule
        self.total = 0
        self.idle = 0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        share = next((share for until, share in self.schedule if self.now < until), 0.0)
        ticks = round(seconds * 200)  # two CPUs at 100 ticks/s
        self.total += ticks
        self.idle += round(ticks * (1 - share))
        self.now += seconds
        self.sleeps.append(seconds)

    def read(self) -> CpuTimes:
        return CpuTimes(self.total, self.idle)


def test_an_idle_machine_is_not_waited_for() -> None:
    machine = FakeMachine([])
    waited = wait_while_busy(0.5, 1030.0, read=machine.read, sleep=machine.sleep, clock=machine.clock)
    assert waited == BusyWait(0.25, 0.0, "idle")  # one sample, taken while sleeping


def test_a_busy_machine_is_waited_for_until_it_eases() -> None:
    machine = FakeMachine([(1004.0, 0.95)])
    waited = wait_while_busy(0.5, 1030.0, read=machine.read, sleep=machine.sleep, clock=machine.clock)
    assert waited.reason == "idle"
    assert waited.busy == pytest.approx(0.0)
    assert waited.waited == pytest.approx(4.25)


def test_the_wait_ends_at_the_deadline_whatever_the_load() -> None:
    machine = FakeMachine([(2000.0, 1.0)])
    waited = wait_while_busy(0.5, 1010.1, read=machine.read, sleep=machine.sleep, clock=machine.clock)
    assert waited.reason == "deadline"
    assert waited.busy == pytest.approx(1.0)
    assert waited.waited == pytest.approx(10.1)  # the last sleep is cut to the deadline
    assert machine.sleeps[-1] == pytest.approx(0.1)
    # A deadline already past (a follow-up of a job that waited): no wait at all.
    past = wait_while_busy(0.5, 900.0, read=machine.read, sleep=machine.sleep, clock=machine.clock)
    assert past == BusyWait(0.0, None, "deadline")


def test_off_and_unmeasurable_never_wait() -> None:
    machine = FakeMachine([(2000.0, 1.0)])
    assert wait_while_busy(1.0, 1030.0, read=machine.read, sleep=machine.sleep, clock=machine.clock) == (
        BusyWait(0.0, None, "off")
    )
    waited = wait_while_busy(0.5, 1030.0, read=lambda: None, sleep=machine.sleep, clock=machine.clock)
    assert waited.reason == "unmeasurable"
    assert waited.waited == pytest.approx(0.25)
