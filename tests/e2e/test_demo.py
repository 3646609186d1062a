"""`modelprint demo`, the README's main command, as a user runs it on a fresh data dir."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelprint.stack import LOCK_FILE_NAME
from shared.embedded import free_port

pytestmark = pytest.mark.e2e


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MODELPRINT_")}
    env.update(
        {
            "MODELPRINT_DATA_DIR": str(tmp_path / "data"),
            "MODELPRINT_GATEWAY_PORT": str(free_port()),
            "MODELPRINT_AUDITOR_PORT": str(free_port()),
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "modelprint.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    summary = next(line for line in output.splitlines() if line.startswith("summary:"))
    assert "labels unchanged True" in summary
    assert "thief flagged while extracting True" in summary
    assert "honest client flagged False" in summary
    assert "surrogate verdict stolen" in summary
    assert "independent model verdict not_stolen" in summary
    assert re.search(r"theft_detected: .*p = [0-9.e-]+", output)
    reports = sorted((tmp_path / "data" / "reports").glob("scan-*.html"))
    assert len(reports) == 2
    assert all("<!DOCTYPE html>" in path.read_text()[:200] for path in reports)
    # The demo stops what it started: nothing holds the data dir's lock any more.
    with open(tmp_path / "data" / LOCK_FILE_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
