"""The service processes' garbage-collector settings (in a fresh interpreter: they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

from shared.gc_tuning import OLDER_THRESHOLDS, YOUNG_THRESHOLD


def test_tuning_freezes_the_start_up_heap_and_raises_the_thresholds() -> None:
    code = (
        "import gc, sklearn.neural_network\n"
        "from shared.gc_tuning import tune_garbage_collector\n"
        "assert gc.get_freeze_count() == 0\n"
        "tune_garbage_collector()\n"
        "print(gc.get_freeze_count(), *gc.get_threshold())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    frozen, *thresholds = (int(value) for value in result.stdout.split())
    assert frozen > 10_000, "the imported modules' objects are frozen"
    assert tuple(thresholds) == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
