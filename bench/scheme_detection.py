"""How strongly each fingerprint scheme marks a surrogate, and what it costs the answers.

For each scheme and strength, thieves distil the ECG model from its fingerprinted answers (natural
queries, fixed seeds, as in the acceptance test) with an MLP, a random forest and a k-NN regressor
on the returned log-probabilities; the scan's watermark-replay test then replays their queries and
reports z against random keys, for several keys. The answers' distortion (mean total variation,
95th percentile and largest change of any class probability, labels changed) is measured on fresh
ECG windows. Prints one table; takes a few minutes on 2 cores.

    .venv/bin/python -m bench.scheme_detection [--keys 2] [--budgets 400,1500] [--schemes a,b]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from modelprint.attacks import ecg_sampler, natural_queries
from modelprint.training import train_ecg_model
from services.auditor.scanstats import ReplaySet, SuspectAnswers, build_reference_kit, run_scan_tests
from shared.ecg import generate_ecg
from shared.fingerprint import get_scheme

SETTINGS = [
    ("hmac-second-class", None),
    ("hmac-all-classes", 0.15),
    ("hmac-all-classes", None),
    ("fast-all-classes", None),
]
BUDGET_SEEDS = {400: 4242, 1500: 4343}


def _thieves() -> dict[str, Any]:
    return {
        "MLP": make_pipeline(
            StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 32), max_iter=1000, random_state=0)
        ),
        "forest": RandomForestRegressor(n_estimators=200, random_state=0, n_jobs=2),
        "k-NN": make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=5)),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2, help="fingerprint keys to try (fixed seeds)")
    parser.add_argument("--budgets", default="400,1500", help="thief query budgets (400 and/or 1500)")
    parser.add_argument("--schemes", default="", help="comma-separated scheme names to run (default: all)")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    victim = train_ecg_model()
    model = victim.estimator
    kit = build_reference_kit(victim.X_test, victim.y_test, list(model.classes_), seed=0)
    # Only the watermark test is read; the control answers just have to be well-formed.
    control = SuspectAnswers(np.argmax(model.predict_proba(kit.control_inputs), axis=1), None)
    fresh, _ = generate_ecg(2000, seed=5)
    clean_fresh = model.predict_proba(fresh)
    queries = {b: natural_queries(ecg_sampler(np.random.default_rng(BUDGET_SEEDS[b])), b) for b in budgets}
    header = (
        f"{'scheme':18s} {'alpha':>5s} {'meanTV':>7s} {'p95|dp|':>7s} {'max|dp|':>7s} {'flips':>5s}  "
        "watermark z by thief@budget/key"
    )
    print(header)
    print("-" * len(header))
    wanted = set(args.schemes.split(",")) if args.schemes else {name for name, _ in SETTINGS}
    for name, alpha in (setting for setting in SETTINGS if setting[0] in wanted):
        scheme = get_scheme(name, alpha)
        keys = [np.random.default_rng(seed).bytes(32) for seed in range(1, args.keys + 1)]
        served = scheme.apply(clean_fresh, fresh, keys[0]).probabilities
        change = np.abs(served - clean_fresh)
        zs = []
        for budget in budgets:
            clean = model.predict_proba(queries[budget])
            for key_index, key in enumerate(keys):
                answers = scheme.apply(clean, queries[budget], key).probabilities
                for thief_name, thief in _thieves().items():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", category=ConvergenceWarning)
                        thief.fit(queries[budget], np.log(answers + 1e-8))
                    predicted = _softmax(thief.predict(queries[budget]))
                    replay = ReplaySet(
                        1, queries[budget], SuspectAnswers(np.argmax(predicted, axis=1), predicted)
                    )
                    outcome = run_scan_tests(
                        model,
                        key,
                        scheme,
                        kit,
                        control,
                        [replay],
                        n_null_keys=200,
                        rng=np.random.default_rng(key_index),
                    )
                    watermark = next(t for t in outcome.tests if t.name.startswith("watermark_replay"))
                    zs.append(f"{thief_name}@{budget}/k{key_index + 1}={float(watermark.details['z']):.1f}")
        print(
            f"{name:18s} {getattr(scheme, 'alpha', 0.0):5.2f} {0.5 * change.sum(axis=1).mean():7.4f} "
            f"{np.quantile(change.max(axis=1), 0.95):7.4f} {change.max():7.3f} "
            f"{int(np.sum(served.argmax(axis=1) != clean_fresh.argmax(axis=1))):5d}  {' '.join(zs)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
