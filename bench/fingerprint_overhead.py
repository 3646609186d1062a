"""Fingerprint overhead in process: plain predict_proba vs each scheme, side by side in one run.

For the paper's MLP (64, 32) on 80 features, at batch sizes 1, 80 and 8,000: repetitions of the
variants are interleaved (so drift and noise hit all alike), and the medians and their ratio to plain
inference are printed. The order of the variants is shuffled in every repetition (fixed seed): a variant
timed right after another one inherits its cache and branch-predictor state, and a fixed order biased
the ratios by several points. Usage:

    .venv/bin/python -m bench.fingerprint_overhead [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from modelprint.training import train_ecg_model
from shared.fingerprint import SCHEMES, get_scheme


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batches", default="1,80,8000")
    args = parser.parse_args()
    trained = train_ecg_model()
    model = trained.estimator
    key = b"k" * 32
    rng = np.random.default_rng(0)
    pool = np.vstack([trained.X_train, trained.X_test])
    schemes = {name: get_scheme(name) for name in SCHEMES if name != "none"}
    print(f"model: {trained.description}; key: 32 bytes; repeats: {args.repeats} (medians)")
    print(f"{'batch':>6} {'variant':<22} {'median ms':>10} {'vs plain':>9} {'rows/s':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        rows = pool[rng.integers(0, pool.shape[0], size=batch)] + rng.normal(
            0, 0.01, size=(batch, pool.shape[1])
        )
        variants: dict[str, Callable[[], object]] = {
            "plain predict_proba": lambda rows=rows: model.predict_proba(rows)
        }
        for name, scheme in schemes.items():
            variants[name] = lambda rows=rows, scheme=scheme: scheme.apply(
                model.predict_proba(rows), rows, key
            )
        timings: dict[str, list[float]] = {name: [] for name in variants}
        repeats = max(5, args.repeats // max(1, batch // 1000))
        names = list(variants)
        for _ in tqdm(range(repeats), desc=f"batch {batch}", leave=False):
            for index in rng.permutation(len(names)):
                started = time.perf_counter()
                variants[names[index]]()
                timings[names[index]].append(time.perf_counter() - started)
        plain = statistics.median(timings["plain predict_proba"])
        for name, values in timings.items():
            median = statistics.median(values)
            print(
                f"{batch:>6} {name:<22} {median * 1e3:>10.3f} {median / plain:>8.2f}x {batch / median:>12.0f}"
            )


if __name__ == "__main__":
    main()
