"""End to end, side by side: the modelprint stack vs MLServer vs a bare FastAPI app, same model and load.

Serves the paper's ECG MLP (64, 32), 80 features, from three servers on 127.0.0.1:

- modelprint: the whole stack as `modelprint up` runs it (gateway -> Celery on Redis -> inference
  worker that fingerprints -> auditor writing every answered row to PostgreSQL), over /v2 with an
  API key;
- mlserver: MLServer 1.7.1 + mlserver-sklearn with default settings, from its own virtualenv
  (`make bench-setup`; it pins fastapi < 0.116, which modelprint cannot share), asked for
  `predict_proba`;
- bare: FastAPI + orjson calling `predict_proba` in process (`bench/bare_app.py`), one process.

Every load point (single-row or batch-80 requests; closed loop at several concurrencies with `wrk`,
open loop at fixed rates) runs against the three servers in turn, repeated with the order rotated,
and the table shows medians; modelprint's figures also as ratios to the other two. After every
modelprint run the benchmark waits until every row answered in that run is in PostgreSQL and prints
the longest such wait ("audit drain"): the lag of the last answered row behind the gateway. Before
every modelprint run it waits for the audit outbox to be empty, so runs do not inherit a backlog.

"CPU ms/req" is the CPU time (user + system) of the server's whole process tree during the run
(for modelprint: gateway, workers, beat, operator API, Redis and PostgreSQL, including storing
the run's rows) divided by the requests answered. On a machine shared with other work it is far
steadier than throughput, which depends on how much CPU the other work leaves.

`--variant NAME:KEY=VALUE,...` adds a modelprint stack with other settings (environment variables
of the services, or GATEWAY_WORKERS / INFERENCE_WORKERS / INFERENCE_CONCURRENCY), measured in the
same rotation: a lever's before and after, side by side.

    .venv/bin/python -m bench.end_to_end                     # about 15 minutes
    .venv/bin/python -m bench.end_to_end --seconds 5 --repeats 1 --concurrency 16 --rates 200
    .venv/bin/python -m bench.end_to_end --servers modelprint,mlserver \
        --variant nobatch:MODELPRINT_MICRO_BATCH_WINDOW_MS=0

Needs `wrk` (`apt-get install -y wrk`) and, for the MLServer column, `make bench-setup`.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil
import psycopg
import redis

from bench.loadgen import LoadResult, Target, closed_loop, open_loop, wrk_available
from modelprint.client import OperatorClient
from modelprint.stack import Stack, StackOptions
from modelprint.training import TrainedModel, save_model, save_reference_data, train_ecg_model
from shared import audit_outbox
from shared.config import Settings, load_secrets
from shared.embedded import free_port, stop_process, wait_for_port

MODEL_NAME = "ecg-mlp"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MLSERVER = REPO_ROOT / ".venv-mlserver" / "bin" / "mlserver"
DISTINCT_BODIES = 32
AUDIT_DRAIN_LIMIT_S = 120.0


def request_bodies(pool: np.ndarray, rows: int, rng: np.random.Generator) -> list[bytes]:
    """Distinct Open Inference Protocol bodies of `rows` rows each (ECG rows plus a little noise)."""
    bodies = []
    for _ in range(DISTINCT_BODIES):
        batch = pool[rng.integers(0, pool.shape[0], size=rows)] + rng.normal(0, 0.01, (rows, pool.shape[1]))
        bodies.append(
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "input-0",
                            "shape": [rows, pool.shape[1]],
                            "datatype": "FP64",
                            "data": batch.ravel().tolist(),
                        }
                    ],
                    "outputs": [{"name": "predict_proba"}],
                }
            )
        )
    return bodies


def process_cpu_seconds(process: psutil.Process) -> float:
    """CPU time (user + system) of a process, with that of its children that have exited and been
    waited for: short-lived forks (Redis's AOF rewrites and snapshots, PostgreSQL backends that
    closed) are otherwise never sampled. Raises psutil.Error if the process is gone."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class Server:
    """A server under test: where to send requests, and (modelprint only) how to see its audit trail."""

    name: str
    host: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)
    root_pids: Callable[[], list[int]] = list
    operator_url: str = ""
    admin_token: str = ""
    audited_rows: Callable[[], int] | None = None
    audit_backlog: Callable[[], int] | None = None
    database_sessions: Callable[[], dict[int, str]] | None = None
    scoring_caught_up: Callable[[], bool] | None = None

    def processes(self) -> list[psutil.Process]:
        """The server's processes and all their children, as they are now."""
        found: list[psutil.Process] = []
        for pid in self.root_pids():
            try:
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
        return found

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's processes and their children."""
        total = 0.0
        for process in self.processes():
            try:
                total += process_cpu_seconds(process)
            except psutil.Error:
                continue
        return total

    def target(self, bodies: list[bytes]) -> Target:
        return Target(self.host, self.port, f"/v2/models/{MODEL_NAME}/infer", self.headers, bodies)


def _wait_answers(url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    with httpx.Client(timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                response = http.post(
                    url, content=body, headers={"Content-Type": "application/json", **headers}
                )
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
    raise TimeoutError(f"{url} does not answer: {last}")


class VariantStack(Stack):
    """A stack whose services get extra environment variables (a lever set differently)."""

    def __init__(self, settings: Settings, options: StackOptions, extra_env: dict[str, str]) -> None:
        super().__init__(settings, options)
        self.extra_env = extra_env

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), **self.extra_env}


STACK_OPTION_KEYS = {"GATEWAY_WORKERS", "INFERENCE_WORKERS", "INFERENCE_CONCURRENCY"}


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`name:KEY=VALUE,KEY=VALUE` -> ("modelprint[name]", {KEY: VALUE}).

    Keys are environment variables of the services, or GATEWAY_WORKERS, INFERENCE_WORKERS and
    INFERENCE_CONCURRENCY (process counts of the stack).
    """
    name, _, assignments = spec.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return f"modelprint[{name}]", env


def parse_stack_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add the stack's process counts to a benchmark's arguments, parse them, and require wrk."""
    defaults = StackOptions()
    parser.add_argument("--inference-workers", type=int, default=defaults.inference_workers)
    parser.add_argument("--inference-concurrency", type=int, default=defaults.inference_concurrency)
    parser.add_argument("--gateway-workers", type=int, default=defaults.gateway_workers)
    args = parser.parse_args()
    if not wrk_available():
        sys.exit("wrk is not installed: `apt-get install -y wrk`")
    return args


def inference_pool_description(args: argparse.Namespace) -> str:
    """The inference workers' pool, as the default variant runs it."""
    from services.inference.config import InferenceSettings

    default = InferenceSettings.model_fields["inference_pool"].default
    pool = os.environ.get("MODELPRINT_INFERENCE_POOL", default)
    return f"prefork pool of {args.inference_concurrency}" if pool == "prefork" else f"{pool} pool"


def stack_options(args: argparse.Namespace, overrides: dict[str, str]) -> StackOptions:
    """The stack's process counts: the command line's, or a variant's."""
    return StackOptions(
        inference_workers=int(overrides.get("INFERENCE_WORKERS", args.inference_workers)),
        inference_concurrency=int(overrides.get("INFERENCE_CONCURRENCY", args.inference_concurrency)),
        gateway_workers=int(overrides.get("GATEWAY_WORKERS", args.gateway_workers)),
        with_beat=True,
    )


@contextmanager
def modelprint_server(
    name: str,
    folder: Path,
    model_path: Path,
    reference_path: Path,
    options: StackOptions,
    probe: bytes,
    extra_env: dict[str, str],
) -> Iterator[Server]:
    """The stack as `modelprint up` runs it, with the model deployed and one API key."""
    settings = Settings(
        data_dir=folder / name, gateway_port=free_port(), auditor_port=free_port(), log_level="WARNING"
    )
    stack = VariantStack(settings, options, extra_env)
    try:
        stack.start()
        with OperatorClient(settings.auditor_url, load_secrets(settings).admin_token) as operator:
            operator.deploy_model(MODEL_NAME, model_path, reference_path)
            created = operator.create_client("bench")
        headers = {"Authorization": f"Bearer {created['api_key']}"}
        _wait_answers(f"{settings.gateway_url}/v2/models/{MODEL_NAME}/infer", probe, headers, 60)
        assert stack.database_url is not None
        assert stack.redis_url is not None
        database = psycopg.connect(
            stack.database_url.replace("postgresql+psycopg://", "postgresql://"), application_name="bench"
        )
        database.autocommit = True
        broker = redis.Redis.from_url(stack.redis_url)

        def audited_rows() -> int:
            # The client's chain length: the rows stored, updated in their transaction. Read in O(1),
            # where counting the stored rows cost PostgreSQL about 0.3 ms of CPU per batch-80 request
            # of the load (bench.cpu_breakdown's "bench" session) while the drain was polled.
            row = database.execute(
                "SELECT length FROM client_chains WHERE client_id = %s", (created["id"],)
            ).fetchone()
            return int(row[0]) if row else 0

        def audit_backlog() -> int:
            return audit_outbox.pending(broker)

        def scoring_caught_up() -> bool:
            """Whether every detector has scored the client's newest stored row (two index probes)."""
            row = database.execute(
                "SELECT (SELECT length FROM client_chains WHERE client_id = %(c)s)"
                " <= (SELECT min(last_seq) FROM suspicion_states WHERE client_id = %(c)s)",
                {"c": created["id"]},
            ).fetchone()
            return bool(row and row[0])

        def database_sessions() -> dict[int, str]:
            """Each PostgreSQL process's client (application_name) or, for the server's own
            processes, its kind (checkpointer, walwriter, ...)."""
            rows = database.execute("SELECT pid, application_name, backend_type FROM pg_stat_activity")
            return {int(pid): name or kind for pid, name, kind in rows.fetchall()}

        try:
            yield Server(
                name,
                settings.gateway_host,
                settings.gateway_port,
                headers,
                operator_url=settings.auditor_url,
                admin_token=load_secrets(settings).admin_token,
                root_pids=lambda: [
                    process.pid
                    for process in [
                        *(service.process for service in stack.services),
                        stack.redis.process if stack.redis else None,
                        stack.postgres.process if stack.postgres else None,
                    ]
                    if process is not None
                ],
                audited_rows=audited_rows,
                audit_backlog=audit_backlog,
                database_sessions=database_sessions,
                scoring_caught_up=scoring_caught_up,
            )
        finally:
            database.close()
            broker.close()
    finally:
        stack.stop()


@contextmanager
def subprocess_server(
    name: str, argv: list[str], port: int, env: dict[str, str], cwd: Path, log: Path, probe: bytes
) -> Iterator[Server]:
    """A server process in its own session, stopped (with its children) on exit."""
    with open(log, "ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - our own interpreters and arguments
            argv, env=env, cwd=cwd, stdout=log_file, stderr=log_file, start_new_session=True
        )
    try:
        wait_for_port("127.0.0.1", port, 120, process)
        _wait_answers(f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer", probe, {}, 120)
        yield Server(name, "127.0.0.1", port, root_pids=lambda: [process.pid])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
        stop_process(process, timeout=20)


def mlserver_server(folder: Path, trained: TrainedModel, mlserver: Path, probe: bytes) -> Any:
    """MLServer with default settings except its ports and 127.0.0.1, serving the same estimator."""
    import joblib

    models = folder / "mlserver"
    models.mkdir()
    joblib.dump(trained.estimator, models / "model.joblib")
    port = free_port()
    (models / "settings.json").write_bytes(
        orjson.dumps(
            {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port()}
        )
    )
    (models / "model-settings.json").write_bytes(
        orjson.dumps(
            {
                "name": MODEL_NAME,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "v1"},
            }
        )
    )
    return subprocess_server(
        "mlserver",
        [str(mlserver), "start", "."],
        port,
        dict(os.environ),
        models,
        folder / "mlserver.log",
        probe,
    )


def bare_server(folder: Path, model_path: Path, probe: bytes) -> Any:
    """FastAPI + orjson + predict_proba in one uvicorn process."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "bench.bare_app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "MODELPRINT_BENCH_MODEL": str(model_path)}
    return subprocess_server("bare", argv, port, env, REPO_ROOT, folder / "bare.log", probe)


@dataclass(frozen=True)
class LoadPoint:
    """One load shape: rows per request, closed loop at `level` connections or open loop at `level`/s."""

    rows: int
    mode: str
    level: int

    @property
    def label(self) -> str:
        load = f"c={self.level}" if self.mode == "closed" else f"{self.level}/s"
        return f"{self.rows:>2} row{'s' if self.rows > 1 else ' '} {self.mode:<6} {load}"


@dataclass
class Measurements:
    runs: dict[tuple[LoadPoint, str], list[LoadResult]] = field(default_factory=dict)
    cpu_ms: dict[tuple[LoadPoint, str], list[float]] = field(default_factory=dict)
    drains: dict[tuple[LoadPoint, str], list[float]] = field(default_factory=dict)
    backlogs: dict[tuple[LoadPoint, str], list[int]] = field(default_factory=dict)


def settle(server: Server) -> int:
    """Wait until the audit outbox is empty and the stored row count stops moving; that count."""
    if server.audited_rows is None or server.audit_backlog is None:
        return 0
    deadline = time.monotonic() + AUDIT_DRAIN_LIMIT_S
    count = server.audited_rows()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        latest = server.audited_rows()
        if latest == count and server.audit_backlog() == 0:
            break
        count = latest
    return count


def measure(
    server: Server, point: LoadPoint, bodies: list[bytes], seconds: float, results: Measurements
) -> None:
    """One run of a load point against one server (and, for modelprint, wait for its audit trail)."""
    before = settle(server)
    target = server.target(bodies)
    cpu_before = server.cpu_seconds()
    if point.mode == "closed":
        result = closed_loop(target, point.level, seconds)
    else:
        result = open_loop(target, point.level, seconds)
    results.runs.setdefault((point, server.name), []).append(result)
    if server.audited_rows is not None and server.audit_backlog is not None:
        ended = time.monotonic()
        backlog = server.audit_backlog()
        expected = before + result.ok * point.rows
        while server.audited_rows() < expected:
            if time.monotonic() - ended > AUDIT_DRAIN_LIMIT_S:
                break
            time.sleep(0.05)
        results.drains.setdefault((point, server.name), []).append(time.monotonic() - ended)
        results.backlogs.setdefault((point, server.name), []).append(backlog)
    # For modelprint this includes storing the run's rows (the drain), part of its cost per request.
    cpu_used = server.cpu_seconds() - cpu_before
    results.cpu_ms.setdefault((point, server.name), []).append(cpu_used * 1e3 / max(1, result.ok))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(points: list[LoadPoint], servers: list[str], results: Measurements) -> None:
    """Medians per point and server, then modelprint's ratios to the others."""
    print(
        f"\n{'load':<24} {'server':<20} {'req/s':>8} {'pred/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'errors':>7} {'req/s range':>15} {'CPU ms/req':>10}"
    )
    for point in points:
        for name in servers:
            runs = results.runs.get((point, name), [])
            if not runs:
                continue
            rates = [run.throughput for run in runs]
            print(
                f"{point.label:<24} {name:<20} {_median(rates):>8.0f} {_median(rates) * point.rows:>8.0f} "
                f"{_median([r.p50_ms for r in runs]):>8.1f} {_median([r.p95_ms for r in runs]):>8.1f} "
                f"{_median([r.p99_ms for r in runs]):>8.1f} {sum(r.errors for r in runs):>7} "
                f"{min(rates):>7.0f}-{max(rates):<7.0f} {_median(results.cpu_ms[(point, name)]):>10.2f}"
            )
        for name in servers:
            kinds: collections.Counter[str] = collections.Counter()
            for run in results.runs.get((point, name), []):
                kinds.update(run.error_kinds)
            if kinds:
                listed = ", ".join(f"{count} x {kind}" for kind, count in kinds.most_common())
                print(f"{'':<24} {name}: errors were {listed}")
        for name in servers:
            drains = results.drains.get((point, name))
            if drains:
                print(
                    f"{'':<24} {name}: every answered row in PostgreSQL within {max(drains):.2f} s of the "
                    f"load's end (longest of {len(drains)}); audit outbox at the end: "
                    f"{max(results.backlogs[(point, name)])} messages"
                )
    ours_names = [name for name in servers if name.startswith("modelprint")]
    others = [name for name in servers if name not in ours_names]
    if not ours_names or not others:
        return
    print("\nmodelprint as a ratio of the others (req/s: higher is better; p99: lower is better)")
    print(
        f"{'load':<24} {'server':<22} "
        + " ".join(f"{'req/s vs ' + o:>16} {'p99 vs ' + o:>14}" for o in others)
    )
    for point, our_name in ((point, name) for point in points for name in ours_names):
        ours = results.runs.get((point, our_name))
        if not ours:
            continue
        cells = []
        for other in others:
            theirs = results.runs.get((point, other))
            if not theirs:
                cells.append(f"{'-':>16} {'-':>14}")
                continue
            throughput = _median([r.throughput for r in ours]) / _median([r.throughput for r in theirs])
            p99 = _median([r.p99_ms for r in ours]) / _median([r.p99_ms for r in theirs])
            cells.append(f"{throughput:>15.2f}x {p99:>13.2f}x")
        print(f"{point.label:<24} {our_name:<22} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="modelprint,mlserver,bare")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per server and load point")
    parser.add_argument("--concurrency", default="1,16,64", help="closed-loop connections")
    parser.add_argument("--rates", default="100,200,400", help="open-loop single-row requests/s")
    parser.add_argument("--batch-rates", default="100", help="open-loop batch-80 requests/s")
    parser.add_argument("--batch", type=int, default=80, help="rows per batch request")
    parser.add_argument("--mlserver", type=Path, default=DEFAULT_MLSERVER, help="the mlserver executable")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run a modelprint stack with these environment variables (a lever set differently), "
        "e.g. nobatch:MODELPRINT_MICRO_BATCH_WINDOW_MS=0",
    )
    args = parse_stack_arguments(parser)
    variants = dict(parse_variant(spec) for spec in args.variant)
    servers = args.servers.split(",") + list(variants)
    if "mlserver" in servers and not args.mlserver.exists():
        sys.exit(f"{args.mlserver} not found: run `make bench-setup` (or pass --mlserver)")
    points = [
        LoadPoint(rows, "closed", int(level))
        for rows in (1, args.batch)
        for level in args.concurrency.split(",")
        if level
    ]
    points += [LoadPoint(1, "open", int(rate)) for rate in args.rates.split(",") if rate]
    points += [LoadPoint(args.batch, "open", int(rate)) for rate in args.batch_rates.split(",") if rate]

    trained = train_ecg_model()
    rng = np.random.default_rng(0)
    pool = np.vstack([trained.X_train, trained.X_test])
    bodies = {rows: request_bodies(pool, rows, rng) for rows in {point.rows for point in points}}
    probe = bodies[1][0] if 1 in bodies else next(iter(bodies.values()))[0]
    results = Measurements()
    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="modelprint-e2e-") as tmp, ExitStack() as running:
        folder = Path(tmp)
        model_path = folder / "ecg.skops"
        save_model(trained.estimator, model_path)
        save_reference_data(trained.X_test, trained.y_test, folder / "reference.npz")
        started_servers: list[Server] = []
        for name in servers:
            print(f"starting {name} ...", flush=True)
            if name.startswith("modelprint"):
                overrides = variants.get(name, {})
                env = {key: value for key, value in overrides.items() if key not in STACK_OPTION_KEYS}
                options = stack_options(args, overrides)
                server = modelprint_server(
                    name, folder, model_path, folder / "reference.npz", options, probe, env
                )
            elif name == "mlserver":
                server = mlserver_server(folder, trained, args.mlserver, probe)
            elif name == "bare":
                server = bare_server(folder, model_path, probe)
            else:
                sys.exit(f"unknown server {name!r}")
            started_servers.append(running.enter_context(server))
        for server in started_servers:  # warm-up, not measured
            closed_loop(server.target(bodies[min(bodies)]), 4, 2)
        for repeat in range(args.repeats):
            for point in points:
                shift = (repeat + points.index(point)) % len(started_servers)
                for server in started_servers[shift:] + started_servers[:shift]:
                    print(f"[{repeat + 1}/{args.repeats}] {point.label} {server.name}", flush=True)
                    measure(server, point, bodies[point.rows], args.seconds, results)
    load_after = os.getloadavg()
    print(
        f"\nmodel: {trained.description}; {args.repeats} runs of {args.seconds:g} s per cell (medians; "
        f"range = min-max req/s); modelprint: {args.gateway_workers} gateway process(es), "
        f"{args.inference_workers} inference worker(s), {inference_pool_description(args)}; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print_table(points, [server.name for server in started_servers], results)


if __name__ == "__main__":
    main()
