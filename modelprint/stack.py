"""`modelprint up`: the whole system on one machine, embedded servers included, in the foreground."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from shared.config import Settings, generate_secrets_file, load_secrets
from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, stop_process
from shared.migrate import upgrade_to_head

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = "modelprint.lock"
MAX_RESTARTS_PER_MINUTE = 5


class AlreadyRunningError(RuntimeError):
    """Another `modelprint up` holds the data dir."""


@dataclass
class ServiceProcess:
    """One supervised child: a gateway, a worker, beat or the operator API."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)

    def start(self, env: dict[str, str]) -> None:
        log_file: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
        log_file.close()

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass
class StackOptions:
    """What to run beside the servers."""

    # With the default solo pool each inference worker is one process running one task at a time;
    # `inference_concurrency` is the pool size of each with MODELPRINT_INFERENCE_POOL=prefork.
    inference_workers: int = 2
    inference_concurrency: int = 2
    gateway_workers: int = 1
    with_beat: bool = True
    ready_timeout: float = 90.0


class Stack:
    """Starts embedded Redis/PostgreSQL when no URLs are configured, migrates, and supervises the services."""

    def __init__(self, settings: Settings, options: StackOptions | None = None) -> None:
        self.settings = settings
        self.options = options or StackOptions()
        self.redis: EmbeddedRedis | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.redis_url = settings.redis_url
        self.database_url = settings.database_url
        self.services: list[ServiceProcess] = []
        self.log_dir = settings.data_dir / "logs"
        self._lock_handle: IO[str] | None = None
        self._stopping = threading.Event()
        self.generated_secrets: Path | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.settings.data_dir / LOCK_FILE_NAME
        handle = open(lock_path, "a+")  # noqa: SIM115 - held for the stack's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunningError(
                f"modelprint is already running on data dir {self.settings.data_dir} (pid {owner}); "
                f"stop it first (Ctrl-C in its terminal, or `kill -TERM {owner}`), "
                "or use another MODELPRINT_DATA_DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def start(self) -> None:
        """Bring everything up; on failure, tear down what was started and re-raise."""
        self._acquire_lock()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.generated_secrets = generate_secrets_file(self.settings)
        load_secrets(self.settings)  # fail early on missing or weak secrets
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.redis_url is None:
            self.redis = EmbeddedRedis(
                self.settings.data_dir / "redis", port=self.settings.embedded_redis_port
            )
            self.redis_url = self.redis.start()
        if self.database_url is None:
            self.postgres = EmbeddedPostgres(
                self.settings.data_dir / "postgres", port=self.settings.embedded_postgres_port
            )
            self.database_url = self.postgres.start()
        upgrade_to_head(self.database_url)
        self._build_services()
        env = self.child_env()
        for service in self.services:
            service.start(env)
        self.wait_ready(self.options.ready_timeout)

    def child_env(self) -> dict[str, str]:
        """The environment every service process gets: the resolved URLs and data dir, no secrets."""
        env = dict(os.environ)
        assert self.redis_url is not None
        assert self.database_url is not None
        env.update(
            {
                "MODELPRINT_REDIS_URL": self.redis_url,
                "MODELPRINT_DATABASE_URL": self.database_url,
                "MODELPRINT_DATA_DIR": str(self.settings.data_dir),
                "MODELPRINT_GATEWAY_PORT": str(self.settings.gateway_port),
                "MODELPRINT_AUDITOR_PORT": str(self.settings.auditor_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _build_services(self) -> None:
        cli = [sys.executable, "-m", "modelprint.cli"]
        specs: list[tuple[str, list[str]]] = [("auditor-api", [*cli, "serve", "auditor"])]
        specs.append(("audit-worker", [*cli, "worker", "audit"]))
        specs.append(("scoring-worker", [*cli, "worker", "scoring"]))
        specs.append(("scan-worker", [*cli, "worker", "scans"]))
        for index in range(self.options.inference_workers):
            specs.append(
                (
                    f"inference-worker-{index + 1}",
                    [
                        *cli,
                        *("worker", "inference", "--index", str(index)),
                        *("--concurrency", str(self.options.inference_concurrency)),
                    ],
                )
            )
        if self.options.with_beat:
            specs.append(("beat", [*cli, "beat"]))
        gateway = [*cli, "serve", "gateway"]
        if self.options.gateway_workers > 1:
            gateway += ["--workers", str(self.options.gateway_workers)]
        specs.append(("gateway", gateway))
        self.services = [ServiceProcess(name, argv, self.log_dir / f"{name}.log") for name, argv in specs]

    def wait_ready(self, timeout: float) -> None:
        """Wait until both HTTP APIs pass their health checks and every worker answers a ping."""
        deadline = time.monotonic() + timeout
        checks = [f"{self.settings.auditor_url}/healthz", f"{self.settings.gateway_url}/v2/health/ready"]
        with httpx.Client(timeout=2.0) as http:
            for url in checks:
                while not self._answers_ok(http, url):
                    self._raise_if_a_service_died()
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{url} not ready after {timeout:.0f} s; logs in {self.log_dir}")
                    time.sleep(0.1)
        while not self._workers_answer_ping():
            self._raise_if_a_service_died()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not start after {timeout:.0f} s; logs in {self.log_dir}")

    @staticmethod
    def _answers_ok(http: httpx.Client, url: str) -> bool:
        try:
            return http.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def _workers_answer_ping(self) -> bool:
        from shared.celery_app import create_celery_app

        app = create_celery_app(self.settings.model_copy(update={"redis_url": self.redis_url}))
        try:
            replies = app.control.ping(timeout=1.0) or []
        finally:
            app.close()
        names = [name for reply in replies for name in reply]
        audit_up = all(
            any(name.startswith(prefix) for name in names) for prefix in ("audit@", "scoring@", "scans@")
        )
        inference_up = sum(name.startswith("inference") for name in names) >= self.options.inference_workers
        return audit_up and inference_up

    def _raise_if_a_service_died(self) -> None:
        for service in self.services:
            code = service.exited()
            if code is not None:
                tail = (
                    service.log_path.read_text(errors="replace")[-3000:] if service.log_path.exists() else ""
                )
                raise RuntimeError(f"{service.name} exited with code {code} during start-up:\n{tail}")

    def supervise(self) -> None:
        """Run until SIGINT/SIGTERM; restart a service that crashes (at most a few times a minute)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stopping.wait(0.5):
                env = self.child_env()
                for service in self.services:
                    code = service.exited()
                    if code is None:
                        continue
                    now = time.monotonic()
                    while service.restarts and now - service.restarts[0] > 60:
                        service.restarts.popleft()
                    if len(service.restarts) >= MAX_RESTARTS_PER_MINUTE:
                        logger.error("service keeps crashing; stopping", extra={"service": service.name})
                        self._stopping.set()
                        break
                    logger.warning(
                        "service exited; restarting", extra={"service": service.name, "exit_code": code}
                    )
                    service.restarts.append(now)
                    service.start(env)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        logger.info("stopping on %s", signal.Signals(signum).name)
        self._stopping.set()

    def request_stop(self) -> None:
        """Make `supervise` return."""
        self._stopping.set()

    def service(self, name: str) -> ServiceProcess:
        """The supervised process with this name."""
        return next(s for s in self.services if s.name == name)

    def kill_service(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a service's whole process group (a Celery worker and its pool children)."""
        process = self.service(name).process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                process.wait(timeout=30)

    def restart_service(self, name: str) -> None:
        """Start a stopped service again with the stack's environment."""
        self.service(name).start(self.child_env())

    def stop(self) -> None:
        """Stop the services (front to back: gateway first), then the servers; release the data dir."""
        for service in reversed(self.services):
            if service.process is not None:
                stop_process(service.process, signal.SIGTERM, timeout=30)
        if self.postgres is not None:
            self.postgres.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None


def pick_free_ports(settings: Settings) -> Settings:
    """A copy of the settings with free gateway and auditor ports (for tests and demos)."""
    return settings.model_copy(update={"gateway_port": free_port(), "auditor_port": free_port()})
