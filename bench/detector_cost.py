"""Cost of the extraction detectors per 80-row update, with and without the stack's malloc tuning.

Each detector of the auditor (`default_detectors`) is fed one client's stream of ECG-like queries in
updates of 80 rows (5,600 rows: the near-duplicate history fills up to its 5,000 rows), as the scoring
task does under batch-80 load, and the time of `update` (state unpacked, rows scored, state packed) is
measured. Every measurement runs in a fresh interpreter, because glibc reads its MALLOC_* variables at
start: alternately with glibc's defaults and with `MALLOC_TUNING` below, which keeps freed memory in the
heap (by default a few-MB numpy temporary is mmapped or trimmed away when freed, so the next one
page-faults again). The stack does not set it: it halves the near-duplicate detector's time here but
did not move the end-to-end figures (README, Benchmarks). Usage:

    .venv/bin/python -m bench.detector_cost [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from tqdm import tqdm

UPDATES = 70
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 1024 * 1024),
}
BATCH = 80
WARMUP = 10


def measure() -> dict[str, float]:
    """Median ms per 80-row update for each detector, in this process (after WARMUP updates)."""
    from modelprint.training import train_ecg_model
    from services.auditor.detectors import ReferenceProfile, default_detectors

    trained = train_ecg_model()
    pool = np.vstack([trained.X_train, trained.X_test])
    profile = ReferenceProfile.from_reference(trained.X_test)
    rng = np.random.default_rng(0)
    detectors = default_detectors(profile)
    states: dict[str, bytes | None] = {detector.name: None for detector in detectors}
    timings: dict[str, list[float]] = {detector.name: [] for detector in detectors}
    classes = trained.estimator.classes_
    for update in range(UPDATES):
        rows = pool[rng.integers(0, pool.shape[0], BATCH)] + rng.normal(0, 0.05, (BATCH, pool.shape[1]))
        labels = np.searchsorted(classes, trained.estimator.predict(rows))
        for detector in detectors:
            started = time.perf_counter()
            states[detector.name], _ = detector.update(states[detector.name], rows, labels)
            if update >= WARMUP:
                timings[detector.name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e3 for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (alternating)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    base = {key: value for key, value in os.environ.items() if key not in MALLOC_TUNING}
    variants = {"glibc defaults": base, "MALLOC_TUNING": {**base, **MALLOC_TUNING}}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, env in variants.items():
            out = subprocess.run(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "bench.detector_cost", "--child"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    detectors = list(results["glibc defaults"][0])
    print(
        f"ms per {BATCH}-row update (median of {UPDATES - WARMUP} updates, "
        f"median over {args.rounds} processes)"
    )
    print(f"{'detector':<22} {'glibc defaults':>15} {'MALLOC_TUNING':>14} {'ratio':>7}")
    totals = dict.fromkeys(variants, 0.0)
    for detector in detectors:
        row = {name: statistics.median(run[detector] for run in runs) for name, runs in results.items()}
        for name in variants:
            totals[name] += row[name]
        ratio = row["MALLOC_TUNING"] / row["glibc defaults"]
        default, tuned = row["glibc defaults"], row["MALLOC_TUNING"]
        print(f"{detector:<22} {default:>15.2f} {tuned:>14.2f} {ratio:>6.2f}x")
    ratio = totals["MALLOC_TUNING"] / totals["glibc defaults"]
    default, tuned = totals["glibc defaults"], totals["MALLOC_TUNING"]
    print(f"{'all three':<22} {default:>15.2f} {tuned:>14.2f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
