"""`modelprint experiment paper`: the paper's Table 1 (Bhojanam & Mehta), reproduced through the real system.

For each trial a victim model is trained, deployed through the operator API and queried through the
gateway, exactly as a customer would:

1. **Accuracy**: the held-out test rows are sent through our gateway by an ordinary client; the labels it
   returns (fingerprinted answers) are scored against the truth next to the plain model's own labels,
   and the share of labels the fingerprint changed is counted (it must be 0).
2. **Overhead**: a batch of 80 rows, plain ``predict_proba`` against ``predict_proba`` + the fingerprint
   scheme's ``apply`` with the stack's active key, in process, repetitions interleaved, medians. These
   are measured for every trial before anything else runs, so the services' work does not disturb them.
3. **Extraction**: one thief client per query budget sends fresh in-distribution rows through the
   gateway and keeps the answers. Two surrogates are trained on them: soft labels (an
   ``MLPRegressor(hidden_layer_sizes=(64, 32))`` regressing the returned log-probabilities, answering
   with their softmax) and hard labels (an ``MLPClassifier(hidden_layer_sizes=(64, 32))`` on the
   returned top-1 labels). Their accuracy and agreement with the victim are measured on the test set.
4. **Detection**: every surrogate is served on 127.0.0.1 over the Open Inference Protocol
   (:class:`modelprint.v2server.V2Server`), registered as a suspect with its thief as the suspected
   client, and scanned through the operator API; each test's p-value and the verdict are recorded.
5. **False positives**: independently trained models (MLP, random forest, logistic regression, k-NN,
   gradient boosting; several seeds; data seeds nobody else used) are served and scanned the same way,
   with one of the thieves as the suspected client. Next to our verdict's false-positive rate, the
   paper's own criterion (raw agreement with the victim on the test data above 0.9) is applied to the
   same models, and the paper's Mann-Whitney U test of surrogate against independent agreements.

The experiment's own stack fingerprints with the paper's scheme (``hmac-second-class``, alpha 0.08) unless
``--scheme`` names another (e.g. modelprint's default ``hmac-all-classes``); a running stack
(``--use-running``) must already use the scheme asked for. Every number comes from the system at run
time: the fingerprint scheme, alpha and key id from the stack's settings, the decision level and the
names of the scan tests from the scans' reports.

Outputs (``--out``): ``table.md``, ``results.json`` (every number, per trial) and two PNG plots.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from modelprint.attacks import ecg_sampler, natural_queries
from modelprint.client import GatewayClient, OperatorClient
from modelprint.experiments.common import (
    FAMILIES,
    LABEL_KINDS,
    Scanner,
    check_scheme,
    describe,
    experiment_stack,
    fingerprint_of,
    fingerprint_text,
    p_text,
    save_figure,
    scan_level,
    scan_test_names,
    score,
    train_classifier,
    train_surrogate,
    trial_count,
    upper_95,
    warm_up,
    write_table_and_results,
)
from modelprint.training import fit_quietly, mlp_pipeline, save_model, save_reference_data, train_ecg_model
from shared.config import Settings, load_secrets
from shared.ecg import generate_ecg
from shared.fingerprint import HmacSecondClassScheme, get_scheme

__all__ = ["DATASETS", "ExperimentConfig", "run_experiment", "thief_seed", "write_outputs"]

logger = logging.getLogger(__name__)

# The paper's seeds (trial 0); trial t uses PAPER_DATA_SEED + t and PAPER_TRAIN_SEED + t.
PAPER_DATA_SEED = 42
PAPER_TRAIN_SEED = 123
# Seeds of the thieves' queries and of the independent models' data. ecg_sampler draws its own
# generate_ecg seeds from [1e6, 2^31) with these as the generator's seed; the independent data seeds
# below lie in [900_000, 1e6), so no thief, victim or independent company ever shares a data seed.
THIEF_SEED_BASE = 5_000
INDEPENDENT_DATA_SEED_BASE = 900_000
TIMING_BATCH = 80
AGREEMENT_THRESHOLD = 0.9  # the paper's criterion, as we read it: agreement with the victim above this
P_FLOOR = 1e-16  # p-values of 0 are drawn at this height on the log-scale plot

# Bhojanam & Mehta, Table 1 (ECG): budget -> (surrogate accuracy, agreement with the victim).
PAPER_EXTRACTION = {150: (0.7200, 0.7167), 400: (0.9300, 0.9267), 1500: (0.9833, 0.9900)}
PAPER_ACCURACY = 0.9933
PAPER_TIMING_MS = {"plain": (4.7, 0.5), "fingerprinted": (7.2, 0.9), "overhead_percent": 52.47}
# The paper's Algorithm 1 (alpha 0.08 is that scheme's default): what `experiment paper` runs by default.
PAPER_SCHEME = HmacSecondClassScheme.name


def thief_seed(trial: int, index: int) -> int:
    """The query seed of trial ``trial``'s thief with the ``index``-th budget of its data set."""
    return THIEF_SEED_BASE + 100 * trial + index


# -- data sets ------------------------------------------------------------------------------------------


@dataclass
class Victim:
    """One trial's victim: the fitted model, its held-out test set and where its data came from."""

    estimator: Any
    X_test: np.ndarray
    y_test: np.ndarray
    description: str
    data_seed: int
    train_seed: int


@dataclass
class TrialData:
    """Everything a trial needs from its data set."""

    victim: Victim
    # (budget, seed) -> the rows a thief with that budget sends, in order
    thief_queries: Callable[[int, int], np.ndarray]
    # seed -> (X, y) of an independent company that never saw our data or our answers
    independent_data: Callable[[int], tuple[np.ndarray, np.ndarray]]
    independent_data_note: str


@dataclass(frozen=True)
class Dataset:
    name: str
    budgets: tuple[int, ...]
    make_trial: Callable[[int], TrialData]
    paper: bool = False


def _ecg_trial(trial: int) -> TrialData:
    data_seed, train_seed = PAPER_DATA_SEED + trial, PAPER_TRAIN_SEED + trial
    trained = train_ecg_model(data_seed=data_seed, train_seed=train_seed)
    victim = Victim(
        trained.estimator, trained.X_test, trained.y_test, trained.description, data_seed, train_seed
    )

    def thief_queries(budget: int, seed: int) -> np.ndarray:
        return natural_queries(ecg_sampler(np.random.default_rng(seed)), budget)

    def independent_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
        return generate_ecg(1200, seed=seed)

    return TrialData(victim, thief_queries, independent_data, "generate_ecg(1200, seed=S), S >= 900,000")


def _bundled_trial(name: str, X: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], trial: int) -> TrialData:
    """Split four ways: victim 50%, test 20% (also the reference data), thieves 15%, independents 15%.

    Thieves send their share's rows in a random order and, past its size, jittered copies (5% of each
    feature's spread); independent companies train on bootstrap resamples of their own share. The two
    shares are disjoint: an independent model trained on the very rows a thief sent is another case
    (its probabilities on those rows are close to the victim's, which the replay tests pick up).
    """
    data_seed, train_seed = PAPER_DATA_SEED + trial, PAPER_TRAIN_SEED + trial

    def split(X_in: np.ndarray, y_in: np.ndarray, share: float) -> list[np.ndarray]:
        parts: list[np.ndarray] = train_test_split(
            X_in, y_in, test_size=share, stratify=y_in, random_state=data_seed
        )
        return parts

    X_victim, X_rest, y_victim, y_rest = split(X, y, 0.5)
    X_test, X_out, y_test, y_out = split(X_rest, y_rest, 0.6)
    X_thief, X_indep, _, y_indep = split(X_out, y_out, 0.5)
    estimator = fit_quietly(mlp_pipeline(hidden, train_seed), X_victim, y_victim)
    description = (
        f"StandardScaler + MLPClassifier{hidden} on {name} ({len(y_victim)} training rows, seed "
        f"{train_seed}; {len(y_test)} held out; {len(X_thief)} rows for thieves and {len(y_indep)} for "
        f"independent companies; split seed {data_seed})"
    )
    victim = Victim(estimator, X_test, y_test, description, data_seed, train_seed)
    spread = X_thief.std(axis=0)

    def thief_queries(budget: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        rows = X_thief[rng.permutation(len(X_thief))][:budget]
        extra = budget - rows.shape[0]
        if extra > 0:
            picks = X_thief[rng.integers(0, len(X_thief), size=extra)]
            rows = np.vstack([rows, picks + rng.normal(0.0, 0.05, size=picks.shape) * spread])
        return np.asarray(rows, dtype=np.float64)

    def independent_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
        pick = np.random.default_rng(seed).integers(0, len(X_indep), size=len(X_indep))
        return X_indep[pick], y_indep[pick]

    return TrialData(
        victim, thief_queries, independent_data, "bootstrap resamples of a 15% share no thief ever sent"
    )


def _breast_cancer_trial(trial: int) -> TrialData:
    data = load_breast_cancer()
    labels = np.asarray(data.target_names)[data.target]
    # The architecture of modelprint.training.train_breast_cancer_model (StandardScaler + MLP (32, 16));
    # its fixed 75/25 split leaves nothing for outsiders, so the data is split four ways here.
    return _bundled_trial("breast-cancer", np.asarray(data.data, np.float64), labels, (32, 16), trial)


def _digits_trial(trial: int) -> TrialData:
    data = load_digits()
    # String labels: the gateway returns class names, and reference data labels are stored as text.
    labels = np.array([str(int(v)) for v in data.target])
    return _bundled_trial("digits", np.asarray(data.data, np.float64), labels, (64, 32), trial)


DATASETS: dict[str, Dataset] = {
    "ecg": Dataset("ecg", (150, 400, 1500), _ecg_trial, paper=True),
    "breast-cancer": Dataset("breast-cancer", (50, 200), _breast_cancer_trial),
    "digits": Dataset("digits", (150, 600), _digits_trial),
}


# -- configuration --------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    dataset: str = "ecg"
    trials: int = 5
    quick: bool = False
    # Seeds per independent family and trial (quick: 1).
    independent_seeds: int = 3
    timing_repeats: int = 300
    agreement_threshold: float = AGREEMENT_THRESHOLD
    # The fingerprint scheme of the experiment's own stack (a running stack must use it).
    scheme: str = PAPER_SCHEME
    command: str = ""
    progress: bool = True

    @property
    def budgets(self) -> tuple[int, ...]:
        return DATASETS[self.dataset].budgets

    @classmethod
    def make(
        cls, dataset: str = "ecg", trials: int | None = None, quick: bool = False, **kwargs: Any
    ) -> ExperimentConfig:
        """The defaults, or the quick ones (1 trial, one seed per independent family, fewer repetitions)."""
        if dataset not in DATASETS:
            raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
        if quick:
            kwargs.setdefault("independent_seeds", 1)
            kwargs.setdefault("timing_repeats", 100)
        config = cls(dataset=dataset, trials=trial_count(trials, quick), quick=quick, **kwargs)
        check_scheme(config.scheme, None)
        return config


# -- measurements ---------------------------------------------------------------------------------------


def measure_overhead(victim: Victim, settings: Settings, key: bytes, repeats: int) -> dict[str, Any]:
    """Batch of 80 rows: plain predict_proba vs predict_proba + the stack's scheme, interleaved."""
    scheme = get_scheme(settings.fingerprint_scheme, settings.fingerprint_alpha)
    model = victim.estimator
    rows = np.asarray(victim.X_test[:TIMING_BATCH], dtype=np.float64)

    def plain() -> object:
        return model.predict_proba(rows)

    def fingerprinted() -> object:
        return scheme.apply(model.predict_proba(rows), rows, key)

    variants: dict[str, Callable[[], object]] = {"plain": plain, "fingerprinted": fingerprinted}
    for run in variants.values():  # warm-up
        for _ in range(5):
            run()
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(repeats):
        # Alternate which variant goes first, so neither always runs on a warmer cache.
        order = list(variants.items()) if index % 2 == 0 else list(variants.items())[::-1]
        for name, run in order:
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    out: dict[str, Any] = {"batch": int(rows.shape[0]), "repeats": repeats}
    for name, values in timings.items():
        ms = np.asarray(values) * 1e3
        out[f"{name}_ms"] = float(np.median(ms))
        out[f"{name}_ms_p25"] = float(np.percentile(ms, 25))
        out[f"{name}_ms_p75"] = float(np.percentile(ms, 75))
    out["overhead_percent"] = 100.0 * (out["fingerprinted_ms"] / out["plain_ms"] - 1.0)
    out["fingerprinted_rows_per_second"] = rows.shape[0] / (out["fingerprinted_ms"] / 1e3)
    return out


def deploy_victim(
    operator: OperatorClient, name: str, estimator: Any, X_ref: np.ndarray, y_ref: np.ndarray, workdir: Path
) -> dict[str, Any]:
    """Deploy a model with its reference data through the operator API; returns the deployment."""
    folder = workdir / name
    folder.mkdir(parents=True)
    sha256 = save_model(estimator, folder / "model.skops")
    save_reference_data(X_ref, y_ref, folder / "reference.npz")
    deployed = operator.deploy_model(name, folder / "model.skops", folder / "reference.npz")
    classes = [str(c) for c in deployed["classes"]]
    if classes != [str(c) for c in estimator.classes_]:
        raise RuntimeError(f"deployed classes {classes} differ from the model's {estimator.classes_}")
    return {**deployed, "sha256": sha256, "classes": classes}


def _run_trial(
    trial: int,
    data: TrialData,
    config: ExperimentConfig,
    settings: Settings,
    operator: OperatorClient,
    model_name: str,
    workdir: Path,
    scanner_of: Callable[[str, list[str]], Scanner],
) -> dict[str, Any]:
    victim = data.victim
    deployed = deploy_victim(operator, model_name, victim.estimator, victim.X_test, victim.y_test, workdir)
    classes = deployed["classes"]
    warm_up(settings, operator, model_name, victim.X_test[0])
    scanner = scanner_of(model_name, classes)
    result: dict[str, Any] = {
        "trial": trial,
        "data_seed": victim.data_seed,
        "train_seed": victim.train_seed,
        "model": {
            "name": model_name,
            "version": deployed["version"],
            "sha256": deployed["sha256"],
            "description": victim.description,
        },
    }

    # 1. accuracy of the plain model and of the labels our gateway returns
    evaluator = operator.create_client(f"{model_name}-evaluator")
    with GatewayClient(settings.gateway_url, evaluator["api_key"]) as gateway:
        returned_labels, returned_probs = gateway.predict_rows(model_name, victim.X_test)
    y_test = np.asarray(victim.y_test).astype(str)
    plain_labels = np.asarray(victim.estimator.predict(victim.X_test)).astype(str)
    changed = int(np.sum(returned_labels != plain_labels))
    result["accuracy"] = {
        "n_test": int(len(y_test)),
        "plain": float(np.mean(plain_labels == y_test)),
        "fingerprinted": float(np.mean(returned_labels == y_test)),
        "labels_changed": changed,
        "labels_changed_share": changed / len(y_test),
        "max_abs_probability_change": float(
            np.max(np.abs(returned_probs - victim.estimator.predict_proba(victim.X_test)))
        ),
    }

    # 2. one thief per budget extracts through the gateway; soft- and hard-label MLP surrogates
    thieves: list[dict[str, Any]] = []
    for index, budget in enumerate(config.budgets):
        seed = thief_seed(trial, index)
        thief = operator.create_client(f"{model_name}-thief-{budget}")
        rows = data.thief_queries(budget, seed)
        with GatewayClient(settings.gateway_url, thief["api_key"]) as gateway:
            labels, probs = gateway.predict_rows(model_name, rows)
        record: dict[str, Any] = {"budget": budget, "client_id": thief["id"], "query_seed": seed}
        record["surrogates"] = {}
        for kind in LABEL_KINDS:
            predict = train_surrogate("mlp", kind, victim.train_seed, rows, labels, probs, classes)
            record["surrogates"][kind] = surrogate = _scored(predict, classes, victim, config)
            scanner.submit(f"{model_name}-{kind}-{budget}", predict, thief["id"], surrogate)
        thieves.append(record)
    result["thieves"] = thieves

    # 3. independent companies: their own data, true labels only; a thief is the suspected client
    independents: list[dict[str, Any]] = []
    for k in range(config.independent_seeds):
        for f_index, family in enumerate(FAMILIES):
            data_seed = INDEPENDENT_DATA_SEED_BASE + 1000 * trial + 10 * k + f_index
            X, y = data.independent_data(data_seed)
            predict = train_classifier(family, k, X, np.asarray(y).astype(str), classes)
            suspected = thieves[len(independents) % len(thieves)]
            record = {
                "family": family,
                "model_seed": k,
                "data_seed": data_seed,
                "suspected_thief_budget": suspected["budget"],
                **_scored(predict, classes, victim, config),
            }
            independents.append(record)
            scanner.submit(f"{model_name}-independent-{family}-{k}", predict, suspected["client_id"], record)
    result["independent"] = independents
    result["independent_data"] = data.independent_data_note
    return result


def _scored(
    predict: Callable[[np.ndarray], np.ndarray], classes: list[str], victim: Victim, config: ExperimentConfig
) -> dict[str, Any]:
    measured = score(predict, classes, victim.estimator, victim.X_test, victim.y_test)
    return {**measured, "paper_criterion_stolen": measured["agreement"] > config.agreement_threshold}


# -- the whole run --------------------------------------------------------------------------------------


def run_experiment(config: ExperimentConfig, settings: Settings | None = None) -> dict[str, Any]:
    """Run the experiment and return every number (``results.json``'s content); writes nothing.

    ``settings`` point at an already running stack (scans of 127.0.0.1 must be allowed there); without
    them a stack is started on a temporary data dir with free ports and stopped at the end.
    """
    spec = DATASETS[config.dataset]
    check_scheme(config.scheme, settings)  # before the victims are trained
    started = time.monotonic()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    trials_data = [
        spec.make_trial(trial)
        for trial in tqdm(range(config.trials), desc="training victims", disable=not config.progress)
    ]
    with experiment_stack(settings, config.scheme) as live:
        secrets = load_secrets(live)
        # 1. timing first, on a quiet machine (no scan is running yet)
        timings = [
            measure_overhead(data.victim, live, secrets.active_key, config.timing_repeats)
            for data in tqdm(trials_data, desc="timing batches of 80", disable=not config.progress)
        ]
        run_id = uuid.uuid4().hex[:8]
        scanners: list[Scanner] = []
        trials: list[dict[str, Any]] = []
        with (
            tempfile.TemporaryDirectory(prefix="modelprint-experiment-models-") as workdir,
            OperatorClient(live.auditor_url, secrets.admin_token) as operator,
        ):

            def scanner_of(model: str, classes: list[str]) -> Scanner:
                scanners.append(Scanner(operator, model, classes))
                return scanners[-1]

            try:
                for trial, data in enumerate(
                    tqdm(
                        trials_data,
                        desc="trials (deploy, extract, submit scans)",
                        disable=not config.progress,
                    )
                ):
                    # One BLAS/OpenMP thread here: the scan worker works on the previous suspects meanwhile,
                    # and oversubscribed BLAS threads on 2 cores slow MLP training down many times over.
                    with threadpool_limits(limits=1):
                        result = _run_trial(
                            trial,
                            data,
                            config,
                            live,
                            operator,
                            f"exp-{spec.name}-{run_id}-t{trial}",
                            Path(workdir),
                            scanner_of,
                        )
                    result["timing"] = timings[trial]
                    trials.append(result)
                waiting = time.monotonic()
                Scanner(operator, "", [], [p for s in scanners for p in s.pending]).collect(config.progress)
                scan_wait_seconds = round(time.monotonic() - waiting, 1)
            finally:
                for scanner in scanners:
                    scanner.stop()
        fingerprint = {**fingerprint_of(live), "key_id": secrets.active_key_id}

    results: dict[str, Any] = {
        "dataset": spec.name,
        "command": config.command,
        "quick": config.quick,
        "budgets": list(config.budgets),
        "trials_run": config.trials,
        "seeds": (
            f"trial t: victim data seed {PAPER_DATA_SEED}+t and training seed {PAPER_TRAIN_SEED}+t (trial 0 "
            f"uses the paper's seeds {PAPER_DATA_SEED} and {PAPER_TRAIN_SEED}); surrogates are trained with "
            f"the trial's training seed; thief of budget index i: query seed {THIEF_SEED_BASE}+100t+i; "
            f"independent model k of family f: data seed {INDEPENDENT_DATA_SEED_BASE}+1000t+10k+f, model "
            "seed k"
        ),
        "fingerprint": fingerprint,
        "agreement_threshold": config.agreement_threshold,
        "independent_seeds": config.independent_seeds,
        "timing_repeats": config.timing_repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "trials": trials,
        "scan_wait_seconds": scan_wait_seconds,
        "runtime_seconds": round(time.monotonic() - started, 1),
    }
    results["scan_level"] = scan_level(_all_records(results))
    results["summary"] = summarise(results)
    return results


def _all_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every scanned suspect's record: the surrogates, then the independent models."""
    surrogates = [s for t in results["trials"] for th in t["thieves"] for s in th["surrogates"].values()]
    return [*surrogates, *(r for t in results["trials"] for r in t["independent"])]


# -- summaries, table, plots ----------------------------------------------------------------------------


def _is_stolen(record: dict[str, Any]) -> bool:
    return bool(record["scan"].get("verdict") == "stolen")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    trials = results["trials"]
    summary: dict[str, Any] = {
        "accuracy_plain": describe([t["accuracy"]["plain"] for t in trials]),
        "accuracy_fingerprinted": describe([t["accuracy"]["fingerprinted"] for t in trials]),
        "labels_changed": int(sum(t["accuracy"]["labels_changed"] for t in trials)),
        "labels_answered": int(sum(t["accuracy"]["n_test"] for t in trials)),
        "plain_ms": describe([t["timing"]["plain_ms"] for t in trials]),
        "fingerprinted_ms": describe([t["timing"]["fingerprinted_ms"] for t in trials]),
        "overhead_percent": describe([t["timing"]["overhead_percent"] for t in trials]),
        "fingerprinted_rows_per_second": describe(
            [t["timing"]["fingerprinted_rows_per_second"] for t in trials]
        ),
        "scans_failed": sum(r["scan"].get("status") != "done" for r in _all_records(results)),
    }
    names = scan_test_names(_all_records(results))
    extraction: dict[str, Any] = {}
    for budget in results["budgets"]:
        row: dict[str, Any] = {}
        for kind in LABEL_KINDS:
            records = [
                th["surrogates"][kind] for t in trials for th in t["thieves"] if th["budget"] == budget
            ]
            row[kind] = {
                "accuracy": describe([r["accuracy"] for r in records]),
                "agreement": describe([r["agreement"] for r in records]),
                "stolen": sum(_is_stolen(r) for r in records),
                "paper_criterion_stolen": sum(r["paper_criterion_stolen"] for r in records),
                "n": len(records),
                "scan_p_values": [r["scan"].get("p_value") for r in records],
                "test_median_p_values": {name: _median_p(records, name) for name in names},
            }
        extraction[str(budget)] = row
    summary["extraction"] = extraction
    independents = [r for t in trials for r in t["independent"]]
    families: dict[str, Any] = {}
    for family in FAMILIES:
        records = [r for r in independents if r["family"] == family]
        if records:
            families[family] = {
                "n": len(records),
                "stolen": sum(_is_stolen(r) for r in records),
                "paper_criterion_stolen": sum(r["paper_criterion_stolen"] for r in records),
                "accuracy": describe([r["accuracy"] for r in records]),
                "agreement": describe([r["agreement"] for r in records]),
                "min_scan_p_value": min((r["scan"].get("p_value") or 1.0) for r in records),
            }
    n = len(independents)
    summary["false_positives"] = {
        "n": n,
        "verdict_stolen": sum(_is_stolen(r) for r in independents),
        "verdict_fpr": sum(_is_stolen(r) for r in independents) / n if n else None,
        "verdict_fpr_upper_95": upper_95(sum(_is_stolen(r) for r in independents), n),
        "paper_criterion_stolen": sum(r["paper_criterion_stolen"] for r in independents),
        "paper_criterion_fpr": sum(r["paper_criterion_stolen"] for r in independents) / n if n else None,
        "paper_criterion_fpr_upper_95": upper_95(sum(r["paper_criterion_stolen"] for r in independents), n),
        "by_family": families,
    }
    # The paper's own "statistical validation": a Mann-Whitney U test of the surrogates' agreements
    # against the independent models' (one-sided). It compares two groups; it cannot judge one suspect.
    surrogate_agreements = [
        r["agreement"] for t in trials for th in t["thieves"] for r in th["surrogates"].values()
    ]
    independent_agreements = [r["agreement"] for r in independents]
    summary["paper_mann_whitney_p"] = (
        float(stats.mannwhitneyu(surrogate_agreements, independent_agreements, alternative="greater").pvalue)
        if surrogate_agreements and independent_agreements
        else None
    )
    return summary


def _median_p(records: list[dict[str, Any]], test: str) -> float | None:
    values = [
        r["scan"]["tests"][test]["p_value"]
        for r in records
        if r["scan"].get("tests", {}).get(test, {}).get("p_value") is not None
    ]
    return float(np.median(values)) if values else None


def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 2, unit: str = "%") -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}{unit}"


def render_table(results: dict[str, Any]) -> str:
    s = results["summary"]
    n = results["trials_run"]
    paper = results["dataset"] == "ecg"
    level = results["scan_level"]
    threshold = results["agreement_threshold"]
    lines = [
        f"# modelprint experiment: {results['dataset']}" + (" (the paper's Table 1)" if paper else ""),
        "",
        f"Mean ± standard deviation over {n} trial(s); measured through the running system (gateway, "
        f"workers, PostgreSQL, operator API, scans). Runtime {results['runtime_seconds']:.0f} s.",
        f"Fingerprint: {fingerprint_text(results['fingerprint'])}.",
        f"Seeds: {results['seeds']}.",
        "",
        "| measure | paper | measured |",
        "| --- | --- | --- |",
    ]

    def row(measure: str, paper_value: str, measured: str) -> None:
        lines.append(f"| {measure} | {paper_value if paper else '-'} | {measured} |")

    row("test accuracy, plain model", f"{PAPER_ACCURACY:.2%}", _pm(s["accuracy_plain"]))
    row(
        "test accuracy, fingerprinted (labels returned by our gateway)",
        f"{PAPER_ACCURACY:.2%}",
        _pm(s["accuracy_fingerprinted"]),
    )
    row(
        "labels changed by the fingerprint",
        "0 (claimed)",
        f"{s['labels_changed']} of {s['labels_answered']:,}",
    )
    row(
        f"batch of {TIMING_BATCH}, plain predict_proba (median, in process)",
        "4.7 ± 0.5 ms",
        _pm(s["plain_ms"], 1.0, 3, " ms"),
    )
    row(
        f"batch of {TIMING_BATCH}, predict_proba + fingerprint",
        "7.2 ± 0.9 ms",
        _pm(s["fingerprinted_ms"], 1.0, 3, " ms"),
    )
    row("fingerprint overhead", "+52.47%", "+" + _pm(s["overhead_percent"], 1.0, 1))
    row(
        "fingerprinted rows per second (in process, batches of 80)",
        "> 11,000",
        f"{s['fingerprinted_rows_per_second']['mean']:,.0f}",
    )
    lines += [
        "",
        "## Extraction and detection",
        "",
        "Surrogates trained on a thief's answers from our gateway; accuracy and agreement with the victim "
        "on the test set. Soft: MLPRegressor (64, 32) on the returned log-probabilities, softmax. Hard: "
        "MLPClassifier (64, 32) on the returned labels. Detected: scans with verdict `stolen` "
        f"(Holm-adjusted p < {level}) / scans; p: the scan's adjusted p-value, median [max].",
        "",
        "| queries | paper acc / agr | soft acc | soft agr | soft detected | soft p | hard acc | hard agr "
        "| hard detected | hard p |",
        "| ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for budget, row_data in s["extraction"].items():
        cells = [f"{int(budget):,}"]
        ref = PAPER_EXTRACTION.get(int(budget)) if paper else None
        cells.append(f"{ref[0]:.2%} / {ref[1]:.2%}" if ref else "-")
        for kind in LABEL_KINDS:
            d = row_data[kind]
            ps = [p for p in d["scan_p_values"] if p is not None]
            p_summary = f"{float(np.median(ps)):.2g} [{max(ps):.2g}]" if ps else "-"
            cells += [_pm(d["accuracy"]), _pm(d["agreement"]), f"{d['stolen']}/{d['n']}", p_summary]
        lines.append("| " + " | ".join(cells) + " |")
    names = scan_test_names(_all_records(results))
    lines += [
        "",
        "Each test's p-value (unadjusted, median over trials) for the same surrogates:",
        "",
        "| queries | labels | " + " | ".join(names) + " |",
        "| ---: | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for budget, row_data in s["extraction"].items():
        for kind in LABEL_KINDS:
            medians = row_data[kind]["test_median_p_values"]
            cells = [f"{int(budget):,}", kind, *(p_text(medians.get(name)) for name in names)]
            lines.append("| " + " | ".join(cells) + " |")
    fp = s["false_positives"]
    lines += [
        "",
        "## False positives on independently trained models",
        "",
        f"Models trained by others on their own data ({results['trials'][0]['independent_data']}), true "
        "labels only, scanned with one of the thieves as the suspected client. The paper's criterion: "
        f"agreement with the victim on the test set above {threshold:g} means stolen.",
        "",
        "| models | n | accuracy | agreement | modelprint `stolen` "
        f"| paper criterion (agreement > {threshold:g}) | smallest scan p |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for family, d in fp["by_family"].items():
        lines.append(
            f"| {family} | {d['n']} | {_pm(d['accuracy'])} | {_pm(d['agreement'])} | {d['stolen']}/{d['n']} "
            f"| {d['paper_criterion_stolen']}/{d['n']} | {d['min_scan_p_value']:.2g} |"
        )
    if fp["n"]:
        lines.append(
            f"| **all** | {fp['n']} | | | **{fp['verdict_stolen']}/{fp['n']} (FPR {fp['verdict_fpr']:.1%}, "
            f"95% upper bound {fp['verdict_fpr_upper_95']:.1%})** "
            f"| **{fp['paper_criterion_stolen']}/{fp['n']} (FPR {fp['paper_criterion_fpr']:.1%})** | |"
        )
    tpr_scan = sum(s["extraction"][b][k]["stolen"] for b in s["extraction"] for k in LABEL_KINDS)
    tpr_paper = sum(
        s["extraction"][b][k]["paper_criterion_stolen"] for b in s["extraction"] for k in LABEL_KINDS
    )
    total = sum(s["extraction"][b][k]["n"] for b in s["extraction"] for k in LABEL_KINDS)
    lines += [
        "",
        f"On the thieves' surrogates, for comparison: modelprint `stolen` {tpr_scan}/{total}, "
        f"paper criterion {tpr_paper}/{total}. The paper's Mann-Whitney U test (surrogates' agreement "
        f"greater than the independent models'): p = {p_text(s['paper_mann_whitney_p'])}."
        + (f" Scans that did not finish: {s['scans_failed']}." if s["scans_failed"] else ""),
        "",
    ]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    s = results["summary"]
    budgets = [int(b) for b in s["extraction"]]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"soft": "-", "hard": "--"}
    for kind in LABEL_KINDS:
        for metric, marker in (("accuracy", "o"), ("agreement", "s")):
            means = [s["extraction"][str(b)][kind][metric]["mean"] * 100 for b in budgets]
            stds = [s["extraction"][str(b)][kind][metric]["std"] * 100 for b in budgets]
            ax.errorbar(
                budgets,
                means,
                yerr=stds,
                linestyle=styles[kind],
                marker=marker,
                capsize=3,
                label=f"{kind}-label surrogate, {metric}",
            )
    ax.axhline(s["accuracy_plain"]["mean"] * 100, color="grey", linestyle=":", label="victim accuracy")
    if results["dataset"] == "ecg":
        paper_budgets = sorted(PAPER_EXTRACTION)
        ax.plot(
            paper_budgets,
            [PAPER_EXTRACTION[b][0] * 100 for b in paper_budgets],
            "kx",
            markersize=9,
            label="paper: accuracy",
        )
        ax.plot(
            paper_budgets,
            [PAPER_EXTRACTION[b][1] * 100 for b in paper_budgets],
            "k+",
            markersize=11,
            label="paper: agreement",
        )
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("thief's queries through the gateway")
    ax.set_ylabel("% of test set")
    ax.set_title(f"{results['dataset']}: surrogate accuracy and agreement ({results['trials_run']} trial(s))")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "accuracy_agreement.png"))

    level = results["scan_level"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), sharey=True, gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, kind in zip(axes[:2], LABEL_KINDS, strict=True):
        for offset, name in enumerate(("scan", *scan_test_names(_all_records(results)))):
            xs, ys = [], []
            for trial in results["trials"]:
                for thief in trial["thieves"]:
                    scan = thief["surrogates"][kind]["scan"]
                    p = (
                        scan.get("p_value")
                        if name == "scan"
                        else (scan.get("tests", {}).get(name) or {}).get("p_value")
                    )
                    if p is not None:
                        xs.append(thief["budget"] * (1 + 0.04 * (offset - 2.5)))
                        ys.append(max(float(p), P_FLOOR))
            if xs:
                ax.plot(
                    xs,
                    ys,
                    "o" if name == "scan" else ".",
                    markersize=8 if name == "scan" else 6,
                    color="black" if name == "scan" else None,
                    label="scan (Holm-adjusted)" if name == "scan" else name,
                    alpha=0.8,
                )
        if level is not None:
            ax.axhline(level, color="red", linestyle="--", label=f"level {level:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("thief's queries")
        ax.set_title(f"{kind}-label surrogates")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"p-value (0 drawn at {P_FLOOR:g})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels))
    ax = axes[2]
    families = list(s["false_positives"]["by_family"])
    for index, family in enumerate(families):
        ps = [
            max(float(r["scan"].get("p_value") or 1.0), P_FLOOR)
            for t in results["trials"]
            for r in t["independent"]
            if r["family"] == family
        ]
        ax.plot([index] * len(ps), ps, "o", alpha=0.7)
    if level is not None:
        ax.axhline(level, color="red", linestyle="--")
    ax.set_xticks(range(len(families)), families, rotation=20, fontsize=8)
    ax.set_title("independent models (scan p)")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{results['dataset']}: detection p-values against the query budget")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    paths.append(save_figure(fig, out_dir / "detection_pvalues.png"))
    return paths


def write_outputs(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write table.md, results.json and the plots into out_dir; returns the paths."""
    return [
        *write_table_and_results(results, render_table(results), out_dir),
        *plot_results(results, out_dir),
    ]
