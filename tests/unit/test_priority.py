"""shared/priority.py: the scoring worker's nice value must reach its scheduling group.

Each case runs in a child process (a fresh one per case: a nice value cannot be lowered again), started
in a session of its own as `modelprint up` starts its services, or in the test's session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.priority import autogroup_nice, lower_cpu_priority

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
