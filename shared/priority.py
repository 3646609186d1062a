"""Lowering a worker's CPU priority so that it actually yields under contention.

A nice value only weighs against processes in the same scheduling group. On Linux with autogroups
(`/proc/sys/kernel/sched_autogroup_enabled` = 1, the default of most distributions' kernels), every
session is a group of its own, and groups share the CPU equally whatever their members' nice values.
`modelprint up` starts each service in a session of its own (so that a Ctrl-C meant for one does not
reach the others), so `os.nice(10)` alone left the scoring worker with the same share as the gateway:
under batch-80 saturation it took 22-25% of the stack's CPU at nice 10 and at nice 19 alike
(`bench.cpu_breakdown`, README). The group has a nice value of its own, `/proc/<pid>/autogroup`,
which an unprivileged process may raise for its own group.

Only a session leader sets it: its group holds its session alone (the worker and the pool children it
forks). A worker started from a shell shares the shell's session, and raising that group's nice value
would slow down everything else run from the same terminal; there the process nice is set and the
group left alone (logged). Containers are cgroups, where nice does not cross either: docker-compose.yml
gives the scoring worker a smaller CPU weight (`cpu_shares`) instead.

A lower priority still lets scoring run in every gap the serving processes leave, which costs them
wake-up latency and cache, so scoring jobs also wait while the machine is busy (`wait_while_busy`,
below).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

AUTOGROUP = Path("/proc/self/autogroup")


@dataclass(frozen=True)
class PriorityOutcome:
    """What `lower_cpu_priority` did: the process's nice value and the group's (None: left alone)."""

    nice: int
    group_nice: int | None
    reason: str


def lower_cpu_priority(nice: int, autogroup: Path = AUTOGROUP) -> PriorityOutcome:
    """Raise this process's nice value to `nice` (never lower it) and, if it leads its own session's
    autogroup, the group's too. Inherited by the processes it forks afterwards."""
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must lie in 0..19, got {nice}")
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    process_nice = max(nice, current)
    if nice == 0:
        return PriorityOutcome(process_nice, None, "nice 0 asked for: nothing to lower")
    if not autogroup.exists():
        return PriorityOutcome(process_nice, None, "no autogroups on this kernel: the process nice applies")
    if os.getsid(0) != os.getpid():
        return PriorityOutcome(
            process_nice,
            None,
            "not a session leader: the session's scheduling group (shared with the shell that started "
            "this worker) keeps its priority, so the nice value weighs only within that session",
        )
    try:
        group_nice = autogroup_nice(autogroup.read_text())
        if nice > group_nice:
            autogroup.write_text(str(nice))
            group_nice = nice
    except (OSError, ValueError) as exc:
        return PriorityOutcome(process_nice, None, f"the scheduling group's nice could not be set ({exc})")
    return PriorityOutcome(process_nice, group_nice, "the session's scheduling group lowered too")


def autogroup_nice(text: str) -> int:
    """The nice value in `/proc/<pid>/autogroup`'s text, e.g. "/autogroup-189 nice 10"."""
    parts = text.split()
    if len(parts) < 3 or parts[-2] != "nice":
        raise ValueError(f"unexpected autogroup line {text.strip()!r}")
    return int(parts[-1])


# Waiting while the machine is busy ---------------------------------------------------------------
#
# A lower priority still lets the scoring worker run whenever a serving process blocks for a moment,
# and then a serving process that wakes waits for it to be preempted, and shares the caches with it:
# under batch-80 saturation (session 15) the stack answered 8-22% more requests with scoring off
# than with it at nice 10. So a scoring job also waits, before it starts, while the rest of the
# machine keeps more than a given share of the CPUs busy, for a bounded time counted from when its
# rows began to wait, and then runs whatever the load.

PROC_STAT = Path("/proc/stat")
# /proc/stat's first line: user nice system idle iowait irq softirq steal (guest time is within user).
_IDLE_FIELDS = (3, 4)
_COUNTED_FIELDS = 8


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far, in clock ticks summed over its CPUs: all of it, and idle."""

    total: int
    idle: int


def read_cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """The machine's CPU times from /proc/stat (None where there is none, e.g. not Linux)."""
    try:
        with path.open() as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 1 + _COUNTED_FIELDS or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1 : 1 + _COUNTED_FIELDS]]
    return CpuTimes(total=sum(ticks), idle=sum(ticks[index] for index in _IDLE_FIELDS))


def busy_share(before: CpuTimes, after: CpuTimes) -> float:
    """The share of the machine's CPU time that was busy between two readings (iowait counts as idle,
    steal as busy: time the CPUs were not ours to use)."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - (after.idle - before.idle) / total))


@dataclass(frozen=True)
class BusyWait:
    """What `wait_while_busy` did: seconds waited, the last busy share seen (None: none measured),
    and why it stopped waiting ("idle", "deadline", "off" or "unmeasurable")."""

    waited: float
    busy: float | None
    reason: str


def wait_while_busy(
    above: float,
    deadline: float,
    *,
    sample_seconds: float = 0.25,
    read: Callable[[], CpuTimes | None] = read_cpu_times,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> BusyWait:
    """Sleep in steps of `sample_seconds` for as long as the machine was busier than the share
    `above` over the last step, but not past `deadline` (a `clock` time). The caller sleeps while it
    measures, so the busy share is everything else's. `above` >= 1 never waits."""
    start = clock()
    if above >= 1.0:
        return BusyWait(0.0, None, "off")
    busy: float | None = None
    while True:
        now = clock()
        if now >= deadline:
            return BusyWait(now - start, busy, "deadline")
        before = read()
        sleep(min(sample_seconds, max(deadline - now, 0.0)))
        after = read()
        if before is None or after is None:
            return BusyWait(clock() - start, None, "unmeasurable")
        busy = busy_share(before, after)
        if busy <= above:
            return BusyWait(clock() - start, busy, "idle")
