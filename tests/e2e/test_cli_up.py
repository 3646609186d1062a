"""`modelprint up` as a user runs it: foreground, refuses a second instance, stops cleanly, keeps data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.embedded import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e


def _env(data_dir: Path, gateway_port: int, auditor_port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MODELPRINT_")}
    env.update(
        {
            "MODELPRINT_DATA_DIR": str(data_dir),
            "MODELPRINT_GATEWAY_PORT": str(gateway_port),
            "MODELPRINT_AUDITOR_PORT": str(auditor_port),
        }
    )
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelprint.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def _start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "modelprint.cli", "up", "--concurrency", "1"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_runs_refuses_a_second_instance_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    gateway_port, auditor_port = free_port(), free_port()
    env = _env(data_dir, gateway_port, auditor_port)
    log = tmp_path / "up.log"
    up = _start_up(env, log)
    try:
        wait_until(
            lambda: "modelprint is up" in log.read_text(), 120, "modelprint up to report it is up", 0.2
        )
        assert _ready(f"http://127.0.0.1:{gateway_port}/v2/health/ready")
        assert "generated an admin token" in log.read_text()

        second = _cli(env, "up")
        assert second.returncode == 1
        assert "already running on data dir" in second.stderr

        created = _cli(env, "clients", "create", "persisted-client")
        assert created.returncode == 0, created.stderr
        client = json.loads(created.stdout)

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        assert "stopped; data kept" in log.read_text()
        assert not _ready(f"http://127.0.0.1:{gateway_port}/v2/health/ready")
        refused = _cli(env, "clients", "list")
        assert refused.returncode == 1
        assert "is `modelprint up` running?" in refused.stderr

        up = _start_up(env, log)
        wait_until(
            lambda: log.read_text().count("modelprint is up") == 2, 120, "the restart to report up", 0.2
        )
        listed = _cli(env, "clients", "list")
        assert listed.returncode == 0, listed.stderr
        assert client["id"] in [entry["id"] for entry in json.loads(listed.stdout)]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
