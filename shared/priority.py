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
"""

from __future__ import annotations

import logging
import os
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
