"""Where the modelprint stack spends its CPU under load: CPU ms per request for each kind of process.

Starts the stack as `bench.end_to_end` does (the ECG MLP deployed, one API key), warms it up, then runs
`wrk` closed loop for `--seconds` and reads the CPU time (user + system) of every process of the stack
before and after, grouped by role: gateway, inference worker, audit worker, scan worker, beat,
operator API, Redis and PostgreSQL (all its backends). It waits until every answered row is in
PostgreSQL before reading the second sample, so the audit trail's cost is counted in full.

With `--profile ROLE[,ROLE]` it also runs `py-spy record` (a benchmark dependency) on those roles'
processes during the load and prints each profile's top functions by own time, so a lever can be
chosen from a measurement. Usage:

    .venv/bin/python -m bench.cpu_breakdown --rows 80 --connections 16 --seconds 15
    .venv/bin/python -m bench.cpu_breakdown --rows 1 --rate 200 --seconds 20   # open loop
    .venv/bin/python -m bench.cpu_breakdown --rows 80 --profile inference,audit --top 25 \\
        --variant tuned:MODELPRINT_INFERENCE_POOL=solo,MODELPRINT_AUDIT_POOL=solo,INFERENCE_WORKERS=2
"""

from __future__ import annotations

import argparse
import collections
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from bench.end_to_end import (
    STACK_OPTION_KEYS,
    Server,
    modelprint_server,
    parse_stack_arguments,
    parse_variant,
    process_cpu_seconds,
    request_bodies,
    stack_options,
)
from bench.loadgen import LoadResult, closed_loop, open_loop
from modelprint.training import save_model, save_reference_data, train_ecg_model

ROLES = {
    ("serve", "gateway"): "gateway",
    ("worker", "inference"): "inference",
    ("worker", "audit"): "audit",
    ("worker", "scoring"): "scoring",
    ("worker", "scans"): "scans",
    ("beat",): "beat",
    ("serve", "auditor"): "operator-api",
}


def role_of(process: psutil.Process) -> str:
    """The stack role of a process, from its command line."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return "gone"
    if any("redis-server" in part for part in argv[:1]) or process.name().startswith("redis"):
        return "redis"
    if process.name().startswith("postgres") or any("postgres" in Path(part).name for part in argv[:1]):
        return "postgresql"
    if "modelprint.cli" in argv:
        rest = argv[argv.index("modelprint.cli") + 1 :]
        for prefix, role in ROLES.items():
            if tuple(rest[: len(prefix)]) == prefix:
                return role
    return "other"


def stack_processes(server: Server) -> dict[int, psutil.Process]:
    return {process.pid: process for process in server.processes()}


def cpu_by_process(processes: dict[int, psutil.Process]) -> dict[int, tuple[str, float]]:
    sample: dict[int, tuple[str, float]] = {}
    for pid, process in processes.items():
        try:
            sample[pid] = (role_of(process), process_cpu_seconds(process))
        except psutil.Error:
            continue
    return sample


def seconds_until(condition: Callable[[], bool], limit: float, interval: float) -> float:
    """Poll `condition` until it holds or `limit` seconds have passed; the seconds waited."""
    started = time.monotonic()
    while not condition() and time.monotonic() - started < limit:
        time.sleep(interval)
    return time.monotonic() - started


def wait_for_audit(server: Server, answered_before: int, answered: int, limit: float = 120.0) -> float:
    """Seconds until the audit trail holds every answered row (rows = requests x rows per request)."""
    audited_rows = server.audited_rows
    assert audited_rows is not None
    return seconds_until(lambda: audited_rows() >= answered_before + answered, limit, 0.1)


def report_scoring_catch_up(
    server: Server,
    processes: dict[int, psutil.Process],
    sample: dict[int, tuple[str, float]],
    in_window: float,
    per_row: float,
    limit: float = 600.0,
) -> None:
    """Wait until every detector has scored the client's last row; print how long and at what CPU.

    Under saturation the scoring worker (nice 10) takes the CPU the serving processes leave and falls
    behind, so its CPU inside the window says how much it was given, not what scoring the load's rows
    costs. This adds the CPU it spends on the rest after the load.
    """
    caught_up = server.scoring_caught_up
    assert caught_up is not None
    waited = seconds_until(caught_up, limit, 0.25)
    scoring = {pid: process for pid, process in processes.items() if role_of(process) == "scoring"}
    later = cpu_by_process(scoring)
    more = sum(seconds - sample.get(pid, ("scoring", 0.0))[1] for pid, (_, seconds) in later.items())
    outcome = "caught up" if caught_up() else f"NOT caught up after {limit:g} s"
    print(
        f"scoring {outcome} {waited:.1f} s after the audit drain, with {more:.2f} CPU s more: "
        f"{(in_window + more) * per_row:.1f} CPU us per row of the load in all"
    )


def top_functions(raw_profile: Path, top: int, inclusive: bool = False) -> list[tuple[float, str]]:
    """Share of samples of the hottest functions in a py-spy `raw` (collapsed stacks) profile: by own
    time, or with `inclusive` by the time they were anywhere on the stack (callees included)."""
    counted: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        for frame in set(frames) if inclusive else frames[-1:]:
            counted[frame] += int(count)
        total += int(count)
    return [(count / max(1, total), frame) for frame, count in counted.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=80, help="rows per request")
    parser.add_argument("--connections", type=int, default=16, help="0: no load, the stack at rest")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="open loop at this many requests/s instead of wrk"
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--profile", default="", help="roles to profile with py-spy, comma-separated")
    parser.add_argument("--top", type=int, default=20, help="functions listed per profile")
    parser.add_argument(
        "--inclusive", action="store_true", help="rank functions by time on the stack, callees included"
    )
    parser.add_argument("--variant", default="", metavar="NAME:KEY=VALUE,...", help="as in bench.end_to_end")
    parser.add_argument(
        "--wait-scoring",
        action="store_true",
        help="after the load, wait until scoring has caught up and add the CPU it took to get there",
    )
    args = parse_stack_arguments(parser)
    profiled = [role for role in args.profile.split(",") if role]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if profiled and not Path(py_spy).exists():
        sys.exit("py-spy is not installed: `make bench-setup`")
    name, overrides = parse_variant(args.variant) if args.variant else ("modelprint", {})
    env = {key: value for key, value in overrides.items() if key not in STACK_OPTION_KEYS}

    trained = train_ecg_model()
    pool = np.vstack([trained.X_train, trained.X_test])
    bodies = request_bodies(pool, args.rows, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(prefix="modelprint-cpu-") as tmp:
        folder = Path(tmp)
        model_path = folder / "ecg.skops"
        save_model(trained.estimator, model_path)
        save_reference_data(trained.X_test, trained.y_test, folder / "reference.npz")
        options = stack_options(args, overrides)
        print(f"starting {name} ...", flush=True)
        with modelprint_server(
            name, folder, model_path, folder / "reference.npz", options, bodies[0], env
        ) as server:
            target = server.target(bodies)
            closed_loop(target, 4, 3)  # warm-up, not measured
            assert server.audited_rows is not None
            assert server.audit_backlog is not None
            # Start from an idle stack: the warm-up's rows stored and their scoring begun.
            deadline = time.monotonic() + 60
            while server.audit_backlog() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)
            processes = stack_processes(server)
            spies: list[tuple[str, int, Path, subprocess.Popen[bytes]]] = []
            for pid, process in processes.items():
                role = role_of(process)
                if role in profiled:
                    output = folder / f"{role}-{pid}.txt"
                    spy = subprocess.Popen(  # noqa: S603 - py-spy with our own arguments
                        [
                            py_spy,
                            "record",
                            "--pid",
                            str(pid),
                            "--format",
                            "raw",
                            "--output",
                            str(output),
                            "--duration",
                            str(int(args.seconds) + 2),
                            "--rate",
                            "200",
                            "--nonblocking",
                            "--gil",  # only samples holding the GIL: CPU, not waits on sockets
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    spies.append((role, pid, output, spy))
            audited_before = server.audited_rows()
            before = cpu_by_process(processes)
            if args.rate:
                result = open_loop(target, args.rate, args.seconds)
            elif args.connections:
                result = closed_loop(target, args.connections, args.seconds)
            else:  # the stack at rest: what it costs with no request at all
                time.sleep(args.seconds)
                result = LoadResult(0, 0, args.seconds, math.nan, math.nan, math.nan)
            drain = wait_for_audit(server, audited_before, result.ok * args.rows)
            processes_after = stack_processes(server)
            after = cpu_by_process(processes_after)
            nice = {role_of(process): process.nice() for process in processes_after.values()}
            for _, _, _, spy in spies:
                spy.wait(timeout=args.seconds + 60)
            sessions = server.database_sessions() if server.database_sessions else {}
            per_role: dict[str, float] = collections.defaultdict(float)
            per_session: dict[str, float] = collections.defaultdict(float)
            for pid, (role, seconds) in after.items():
                used = seconds - before.get(pid, (role, 0.0))[1]
                per_role[role] += used
                if role == "postgresql":
                    per_session[sessions.get(pid, "postmaster")] += used
            total = sum(per_role.values())
            if not args.connections and not args.rate:
                print(f"\n{name} at rest for {args.seconds:g} s: CPU by role")
                print(f"{'role':<14} {'nice':>4} {'CPU s':>7} {'% of a core':>12}")
                for role, seconds in sorted(per_role.items(), key=lambda item: -item[1]):
                    print(
                        f"{role:<14} {nice.get(role, 0):>4} {seconds:>7.2f} {seconds / args.seconds:>12.1%}"
                    )
                print(f"{'all':<14} {'':>4} {total:>7.2f} {total / args.seconds:>12.1%}")
                print_profiles(spies, args.top, args.inclusive)
                return
            load = f"open loop {args.rate:g}/s" if args.rate else f"wrk -c{args.connections}"
            per_request, per_row = 1e3 / max(1, result.ok), 1e6 / max(1, result.ok * args.rows)
            print(
                f"\n{name}: {args.rows}-row requests, {load} for {args.seconds:g} s: {result.ok} answered "
                f"({result.throughput:.0f}/s, "
                f"{result.throughput * args.rows:,.0f} rows/s), "
                f"{result.errors} errors, p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms, "
                f"p99 {result.p99_ms:.1f} ms; "
                f"audit drained {drain:.1f} s after the load"
            )
            print(
                f"{'role':<14} {'nice':>4} {'CPU s':>7} {'share':>6} "
                f"{'CPU ms/request':>15} {'CPU us/row':>11}"
            )
            for role, seconds in sorted(per_role.items(), key=lambda item: -item[1]):
                print(
                    f"{role:<14} {nice.get(role, 0):>4} {seconds:>7.2f} {seconds / total:>6.0%} "
                    f"{seconds * per_request:>15.2f} {seconds * per_row:>11.1f}"
                )
            print(
                f"{'all':<14} {'':>4} {total:>7.2f} {'':>6} {total * 1e3 / max(1, result.ok):>15.2f} "
                f"{total * 1e6 / max(1, result.ok * args.rows):>11.1f}"
            )
            if args.wait_scoring:
                report_scoring_catch_up(server, processes_after, after, per_role["scoring"], per_row)
            print_postgresql_split(per_session, per_role["postgresql"], per_request, per_row)
            print_profiles(spies, args.top, args.inclusive)


def print_postgresql_split(
    per_session: dict[str, float], total: float, per_request: float, per_row: float
) -> None:
    """PostgreSQL's CPU by whose session it served (application_name: "modelprint audit-worker", the
    benchmark's own "bench" polling) or by server process (checkpointer, walwriter, ...)."""
    if not per_session or total <= 0:
        return
    heading = f"{'PostgreSQL by session':<34} {'CPU s':>7} {'share':>6}"
    print(f"\n{heading} {'CPU ms/request':>15} {'CPU us/row':>11}")
    for session, seconds in sorted(per_session.items(), key=lambda item: -item[1]):
        print(
            f"{session:<34} {seconds:>7.2f} {seconds / total:>6.0%} "
            f"{seconds * per_request:>15.2f} {seconds * per_row:>11.1f}"
        )


def print_profiles(
    spies: list[tuple[str, int, Path, subprocess.Popen[bytes]]], top: int, inclusive: bool = False
) -> None:
    """Each py-spy profile's hottest functions by own time (or by inclusive time)."""
    for role, pid, output, _ in spies:
        if not output.exists():
            print(f"\n{role} (pid {pid}): no profile (idle, or py-spy lacks permission)")
            continue
        print(f"\n{role} (pid {pid}): hottest functions by {'inclusive' if inclusive else 'own'} time")
        for share, frame in top_functions(output, top, inclusive):
            print(f"  {share:>6.1%}  {frame}")


if __name__ == "__main__":
    main()
