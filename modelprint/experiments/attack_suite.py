"""`modelprint experiment attacks`: extraction strategies x thief families x soft/hard labels x budgets.

The paper's ECG victim (seeds 42 / 123) is deployed behind the real stack. For every query strategy
and budget a new thief client extracts it through the gateway:

- ``natural``: fresh in-distribution ECG windows (what an honest client sends);
- ``uniform``: uniform noise over the reference data's per-feature box (Tramer et al. 2016);
- ``jacobian``: Jacobian-based dataset augmentation from 10 natural seeds (Papernot et al. 2017,
  :class:`modelprint.attacks.JacobianAugmentation`), label-only, adaptive;
- ``knockoff``: ART's ``KnockoffNets`` (random sampling) over a related-domain transfer set: natural
  ECG windows from "another recorder" (unaligned windows, other gain and baseline);
- ``copycat``: ART's ``CopycatCNN`` over non-problem-domain data (smooth random signals scaled to the
  ECG's range).

ART drives our gateway through a ``BlackBoxClassifier`` whose predict calls the prediction API, and
fits its thief (a hard-label MLP, through a scikit-learn wrapper that drops the Keras-style fit
arguments). Every answer the thief received is kept, and every thief family (MLP, random forest,
logistic regression, k-NN, gradient boosting) is trained on it with soft labels (regressing the
returned log-probabilities) and hard labels (top-1). For each surrogate: accuracy and agreement with
the victim on the held-out test set, and a scan through the operator API with the thief as the
suspected client (verdict, scan p-value and every test's p-value). For each thief client: whether the
live detectors flagged it; the largest budget of each strategy is sent in chunks of 50, waiting for
the auditor to score each chunk, so "flagged after N queries" is exact to 50 queries. Independent
models (trained by another company on its own ECG data) are scanned against each strategy's largest
thief, to see whether an unusual replayed history makes the replay tests accuse the innocent.

The suite's own stack fingerprints with modelprint's default scheme unless ``--scheme`` names another.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from modelprint.attacks import JacobianAugmentation, ecg_sampler, natural_queries, uniform_random_queries
from modelprint.client import GatewayClient, OperatorClient
from modelprint.experiments.common import (
    FAMILIES,
    LABEL_KINDS,
    Predictor,
    Scanner,
    check_scheme,
    experiment_stack,
    fingerprint_of,
    fingerprint_text,
    make_classifier,
    p_text,
    save_figure,
    scan_level,
    score,
    train_classifier,
    train_surrogate,
    warm_up,
    write_table_and_results,
)
from modelprint.experiments.paper import deploy_victim
from modelprint.training import train_ecg_model
from shared.config import Settings, load_secrets
from shared.ecg import generate_ecg
from shared.fingerprint import DEFAULT_SCHEME

__all__ = ["STRATEGIES", "SuiteConfig", "run_suite", "write_outputs"]

logger = logging.getLogger(__name__)

STRATEGIES = ("natural", "uniform", "jacobian", "knockoff", "copycat")
ART_STRATEGIES = ("knockoff", "copycat")
BUDGETS = (50, 200, 1000, 5000)
QUICK_BUDGETS = (400,)
PACE_CHUNK = 50
INDEPENDENT_FAMILIES = ("mlp", "random-forest")
SEED = 2026
# ECG data seeds of the thieves' pools and the independent companies: never the victim's 42.
POOL_SEED = 31_000
INDEPENDENT_SEED = 41_000


@dataclass
class SuiteConfig:
    budgets: tuple[int, ...] = BUDGETS
    strategies: tuple[str, ...] = STRATEGIES
    families: tuple[str, ...] = FAMILIES
    independent_families: tuple[str, ...] = INDEPENDENT_FAMILIES
    quick: bool = False
    # The fingerprint scheme of the suite's own stack (a running stack must use it): modelprint's default.
    scheme: str = DEFAULT_SCHEME
    command: str = ""
    progress: bool = True
    scored_timeout: float = 120.0

    @classmethod
    def make(cls, quick: bool = False, **kwargs: Any) -> SuiteConfig:
        """The full grid, or the quick one (one budget, MLP thieves, one independent model)."""
        if quick:
            kwargs.setdefault("budgets", QUICK_BUDGETS)
            kwargs.setdefault("families", ("mlp",))
            kwargs.setdefault("independent_families", ("mlp",))
        config = cls(quick=quick, **kwargs)
        check_scheme(config.scheme, None)
        return config


# -- query pools ----------------------------------------------------------------------------------------


def knockoff_pool(n: int, rng: np.random.Generator) -> np.ndarray:
    """Related-domain natural data: ECG windows from another recorder (unaligned, other gain and baseline)."""
    X, _ = generate_ecg(max(n, 4), seed=int(rng.integers(POOL_SEED, POOL_SEED + 1000)))
    shifts = rng.integers(-8, 9, size=n)
    rows = np.stack([np.roll(row, int(shift)) for row, shift in zip(X[:n], shifts, strict=True)])
    return rows * rng.uniform(0.6, 1.4, size=(n, 1)) + rng.normal(0.0, 0.1, size=(n, 1))


def copycat_pool(n: int, rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    """Non-problem-domain data: sums of three random sinusoids plus noise, scaled to the ECG's range."""
    t = np.linspace(0.0, 2.0, reference.shape[1], endpoint=False)
    frequency = rng.uniform(0.5, 8.0, size=(n, 3, 1))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 3, 1))
    signal = np.sin(2 * np.pi * frequency * t + phase).sum(axis=1) + rng.normal(0, 0.2, (n, t.size))
    signal = (signal - signal.mean()) / signal.std()
    out: np.ndarray = signal * reference.std() + reference.mean()
    return out


# -- a thief client -------------------------------------------------------------------------------------


@dataclass
class ThiefClient:
    """A client extracting through the gateway: keeps every answer; when paced, notes when it was flagged."""

    client_id: int
    gateway: GatewayClient
    operator: OperatorClient
    model: str
    classes: list[str]
    paced: bool
    scored_timeout: float
    rows: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    flagged_after: int | None = None
    flagged_by: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(block.shape[0] for block in self.rows)

    def ask(self, rows: np.ndarray) -> np.ndarray:
        """Send rows (in chunks of 50 while pacing); returns the probabilities in the victim's class order."""
        rows = np.asarray(rows, dtype=np.float64)
        step = PACE_CHUNK if self.paced and self.flagged_after is None else 100
        answers = []
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            labels, probabilities = self.gateway.predict_rows(self.model, chunk)
            self.rows.append(chunk)
            self.labels.append(labels)
            self.probabilities.append(probabilities)
            answers.append(probabilities)
            if self.paced and self.flagged_after is None:
                report = self.wait_scored()
                if report["level"] != "none":
                    self.flagged_after = self.sent
                    self.flagged_by = alarms(report, self.model)
        return np.concatenate(answers) if answers else np.empty((0, len(self.classes)))

    def ask_labels(self, rows: np.ndarray) -> np.ndarray:
        """The label-only oracle of a Jacobian attacker: class indices."""
        return np.argmax(self.ask(rows), axis=1)

    def wait_scored(self) -> dict[str, Any]:
        """The suspicion report once the auditor has scored every query sent so far."""
        deadline = time.monotonic() + self.scored_timeout
        while True:
            report = self.operator.suspicion(self.client_id)
            results = report["models"].get(self.model, [])
            if results and all(result["queries_seen"] >= self.sent for result in results):
                return report
            if time.monotonic() > deadline:
                raise RuntimeError(f"client {self.client_id}: {self.sent} queries not scored after deadline")
            time.sleep(0.2)

    def answers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self.rows), np.concatenate(self.labels), np.concatenate(self.probabilities)


def alarms(report: dict[str, Any], model: str) -> list[str]:
    return [str(result["detector"]) for result in report["models"].get(model, []) if result["alarm"]]


def _art_extract(strategy: str, thief: ThiefClient, pool: np.ndarray, budget: int, seed: int) -> Predictor:
    """Run ART's KnockoffNets / CopycatCNN against our gateway; returns ART's fitted hard-label MLP thief."""
    with warnings.catch_warnings():
        # ART warns that PyTorch is missing; its scikit-learn and black-box parts do not need it.
        warnings.simplefilter("ignore", UserWarning)
        from art.attacks.extraction import CopycatCNN, KnockoffNets
        from art.estimators.classification import BlackBoxClassifier
        from art.estimators.classification.scikitlearn import ScikitlearnClassifier

    class SklearnThief(ScikitlearnClassifier):
        """ART's wrapper passes batch_size and nb_epochs on to fit(), which scikit-learn rejects."""

        def fit(self, x: np.ndarray, y: np.ndarray, **_: Any) -> None:
            super().fit(x, y)

    victim = BlackBoxClassifier(thief.ask, input_shape=(pool.shape[1],), nb_classes=len(thief.classes))
    attack_class = KnockoffNets if strategy == "knockoff" else CopycatCNN
    options = {"sampling_strategy": "random", "verbose": False} if strategy == "knockoff" else {}
    attack = attack_class(
        victim,
        batch_size_fit=budget,
        batch_size_query=100,
        nb_epochs=1,
        nb_stolen=budget,
        use_probability=True,
        **options,
    )
    np.random.seed(seed)  # ART samples its queries from the pool with numpy's global generator
    fitted = attack.extract(pool, thieved_classifier=SklearnThief(make_classifier("mlp", seed)))
    model = fitted.model
    n_classes = len(thief.classes)

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], n_classes))
        out[:, model.classes_] = model.predict_proba(rows)
        return out

    return predict_proba


def _extract(
    strategy: str, thief: ThiefClient, budget: int, seed: int, reference: np.ndarray
) -> Predictor | None:
    """Send the strategy's queries; returns ART's own thief for the ART strategies, else None."""
    rng = np.random.default_rng(seed)
    if strategy == "natural":
        thief.ask(natural_queries(ecg_sampler(rng), budget))
    elif strategy == "uniform":
        thief.ask(uniform_random_queries(reference, budget, rng))
    elif strategy == "jacobian":
        seeds = natural_queries(ecg_sampler(rng), 10)
        JacobianAugmentation(seeds, thief.ask_labels, rng, step=0.1, feature_scale=reference.std(axis=0)).run(
            budget
        )
    elif strategy == "knockoff":
        return _art_extract(strategy, thief, knockoff_pool(2 * budget, rng), budget, seed)
    elif strategy == "copycat":
        return _art_extract(strategy, thief, copycat_pool(2 * budget, rng, reference), budget, seed)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return None


# -- the run --------------------------------------------------------------------------------------------


def run_suite(config: SuiteConfig, settings: Settings | None = None) -> dict[str, Any]:
    """Run every strategy and budget against the ECG victim; returns every number (``results.json``)."""
    check_scheme(config.scheme, settings)
    started = time.monotonic()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("art").setLevel(logging.ERROR)
    victim = train_ecg_model()
    reference, classes_order = victim.X_test, [str(c) for c in victim.estimator.classes_]
    # Score suspicion after every 50 new queries, so "flagged after" is exact to a chunk.
    env = {"MODELPRINT_SUSPICION_EVERY": str(PACE_CHUNK), "MODELPRINT_SUSPICION_BEAT_SECONDS": "5"}
    with experiment_stack(settings, config.scheme, env) as live:
        secrets = load_secrets(live)
        with (
            tempfile.TemporaryDirectory(prefix="modelprint-attacks-") as workdir,
            OperatorClient(live.auditor_url, secrets.admin_token) as operator,
        ):
            model = f"attacks-ecg-{uuid.uuid4().hex[:8]}"
            deployed = deploy_victim(
                operator, model, victim.estimator, reference, victim.y_test, Path(workdir)
            )
            classes = deployed["classes"]
            assert classes == classes_order
            warm_up(live, operator, model, reference[0])
            scanner = Scanner(operator, model, classes)
            runs: list[dict[str, Any]] = []
            thieves: list[ThiefClient] = []
            grid = [(s, b) for s in config.strategies for b in config.budgets]
            try:
                for index, (strategy, budget) in enumerate(
                    tqdm(grid, desc="attacks (extract, train, submit scans)", disable=not config.progress)
                ):
                    seed = SEED + index
                    created = operator.create_client(f"{model}-{strategy}-{budget}")
                    with (
                        GatewayClient(live.gateway_url, created["api_key"]) as gateway,
                        threadpool_limits(limits=1),
                    ):
                        thief = ThiefClient(
                            created["id"],
                            gateway,
                            operator,
                            model,
                            classes,
                            paced=budget == max(config.budgets),
                            scored_timeout=config.scored_timeout,
                        )
                        art_thief = _extract(strategy, thief, budget, seed, reference)
                        run = _train_and_submit(
                            config, strategy, budget, seed, thief, art_thief, victim, classes, scanner
                        )
                    thieves.append(thief)
                    runs.append(run)
                independents = _submit_independents(config, runs, victim, classes, scanner)
                for run, thief in zip(runs, thieves, strict=True):
                    report = thief.wait_scored()
                    run["live"] = {
                        "level": report["level"],
                        "alarms": alarms(report, model),
                        "paced": thief.paced,
                        "flagged_after": thief.flagged_after,
                        "flagged_by": thief.flagged_by,
                    }
                scanner.collect(config.progress)
            finally:
                scanner.stop()
    results: dict[str, Any] = {
        "command": config.command,
        "quick": config.quick,
        "victim": victim.description,
        "victim_accuracy": victim.test_accuracy,
        "strategies": list(config.strategies),
        "budgets": list(config.budgets),
        "families": list(config.families),
        "pace_chunk": PACE_CHUNK,
        "fingerprint": fingerprint_of(live),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "runs": runs,
        "independent": independents,
        "runtime_seconds": round(time.monotonic() - started, 1),
    }
    records = [*(s for run in runs for s in run["surrogates"]), *independents]
    results["scan_level"] = scan_level(records)
    results["summary"] = summarise(results)
    return results


def _train_and_submit(
    config: SuiteConfig,
    strategy: str,
    budget: int,
    seed: int,
    thief: ThiefClient,
    art_thief: Predictor | None,
    victim: Any,
    classes: list[str],
    scanner: Scanner,
) -> dict[str, Any]:
    rows, labels, probabilities = thief.answers()
    run: dict[str, Any] = {
        "strategy": strategy,
        "budget": budget,
        "sent": int(rows.shape[0]),
        "client_id": thief.client_id,
        "seed": seed,
        "answered_classes": {c: int(np.sum(labels == c)) for c in classes},
        "surrogates": [],
    }
    for family in config.families:
        for kind in LABEL_KINDS:
            if art_thief is not None and (family, kind) == ("mlp", "hard"):
                predict = art_thief  # the thief ART itself trained
            else:
                predict = train_surrogate(family, kind, seed, rows, labels, probabilities, classes)
            record = {
                "family": family,
                "kind": kind,
                **score(predict, classes, victim.estimator, victim.X_test, victim.y_test),
            }
            run["surrogates"].append(record)
            scanner.submit(f"{strategy}-{budget}-{family}-{kind}", predict, thief.client_id, record)
    return run


def _submit_independents(
    config: SuiteConfig, runs: list[dict[str, Any]], victim: Any, classes: list[str], scanner: Scanner
) -> list[dict[str, Any]]:
    """Another company's models (own ECG data, true labels) scanned against each strategy's largest thief."""
    records = []
    for index, family in enumerate(config.independent_families):
        X, y = generate_ecg(1200, seed=INDEPENDENT_SEED + index)
        predict = train_classifier(family, index, X, np.asarray(y).astype(str), classes)
        measured = score(predict, classes, victim.estimator, victim.X_test, victim.y_test)
        for run in runs:
            if run["budget"] != max(config.budgets):
                continue
            record = {"family": family, "strategy": run["strategy"], "budget": run["budget"], **measured}
            records.append(record)
            scanner.submit(f"independent-{family}-vs-{run['strategy']}", predict, run["client_id"], record)
    return records


# -- summary, table, plot -------------------------------------------------------------------------------


def _stolen(record: dict[str, Any]) -> bool:
    return bool(record["scan"].get("verdict") == "stolen")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    runs = results["runs"]
    rows = []
    for run in runs:
        surrogates = run["surrogates"]
        row = {
            "strategy": run["strategy"],
            "budget": run["budget"],
            "flagged": run["live"]["level"] != "none",
            "flagged_after": run["live"]["flagged_after"],
            "alarms": run["live"]["alarms"],
        }
        for kind in LABEL_KINDS:
            of_kind = [s for s in surrogates if s["kind"] == kind]
            row[kind] = {
                "stolen": sum(_stolen(s) for s in of_kind),
                "n": len(of_kind),
                "best_agreement": max(s["agreement"] for s in of_kind),
                "best_accuracy": max(s["accuracy"] for s in of_kind),
            }
        rows.append(row)
    independents = results["independent"]
    return {
        "by_run": rows,
        "independent_stolen": sum(_stolen(r) for r in independents),
        "independent_n": len(independents),
        "scans_failed": sum(
            r["scan"].get("status") != "done"
            for r in [*(s for run in runs for s in run["surrogates"]), *independents]
        ),
    }


def _flag_text(run: dict[str, Any]) -> str:
    live = run["live"]
    if live["level"] == "none":
        return "no"
    alarms_text = ", ".join(live["alarms"])
    if live["flagged_after"] is not None:
        return f"after {live['flagged_after']:,} ({alarms_text})"
    return f"yes ({alarms_text})"


def render_table(results: dict[str, Any]) -> str:
    level = results["scan_level"]
    lines = [
        "# modelprint experiment attacks",
        "",
        f"Victim: {results['victim']}, test accuracy {results['victim_accuracy']:.2%}. One thief client per "
        f"strategy and budget, through the gateway; runtime {results['runtime_seconds']:.0f} s. Live: "
        "flagged by the suspicion detectors (the largest budget is sent in chunks of "
        f"{results['pace_chunk']} "
        f'and scored after each, so "after N" is exact to a chunk). Scans: verdict `stolen` at '
        f"Holm-adjusted p < {level}. Fingerprint: {fingerprint_text(results['fingerprint'])}.",
        "",
        "## Summary per strategy and budget",
        "",
        "| strategy | queries | live: flagged | soft-label surrogates stolen | hard-label surrogates stolen "
        "| best agreement soft / hard |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for run, row in zip(results["runs"], results["summary"]["by_run"], strict=True):
        lines.append(
            f"| {run['strategy']} | {run['budget']:,} | {_flag_text(run)} "
            f"| {row['soft']['stolen']}/{row['soft']['n']} | {row['hard']['stolen']}/{row['hard']['n']} "
            f"| {row['soft']['best_agreement']:.2%} / {row['hard']['best_agreement']:.2%} |"
        )
    lines += [
        "",
        "## Every surrogate",
        "",
        "Accuracy and agreement with the victim on the held-out test set; the scan's verdict and "
        "Holm-adjusted p-value (every test's p-value is in results.json).",
        "",
        "| strategy | queries | family | soft acc / agr | soft verdict (p) | hard acc / agr "
        "| hard verdict (p) |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        for family in results["families"]:
            cells = [run["strategy"], f"{run['budget']:,}", family]
            for kind in LABEL_KINDS:
                record = next(s for s in run["surrogates"] if s["family"] == family and s["kind"] == kind)
                scan = record["scan"]
                verdict = scan.get("verdict") or scan.get("status")
                cells += [
                    f"{record['accuracy']:.1%} / {record['agreement']:.1%}",
                    f"{'**stolen**' if verdict == 'stolen' else verdict} ({p_text(scan.get('p_value'))})",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    summary = results["summary"]
    lines += [
        "",
        "## Independent models scanned against each strategy's largest thief",
        "",
        "| model | accuracy / agreement | suspected client | verdict (p) |",
        "| --- | --- | --- | --- |",
    ]
    for record in results["independent"]:
        scan = record["scan"]
        lines.append(
            f"| {record['family']} | {record['accuracy']:.1%} / {record['agreement']:.1%} "
            f"| {record['strategy']} thief, {record['budget']:,} queries "
            f"| {scan.get('verdict') or scan.get('status')} ({p_text(scan.get('p_value'))}) |"
        )
    lines += [
        "",
        f"Independent models called stolen: {summary['independent_stolen']}/{summary['independent_n']}."
        + (f" Scans that did not finish: {summary['scans_failed']}." if summary["scans_failed"] else ""),
        "",
    ]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    budgets = results["budgets"]
    for index, strategy in enumerate(results["strategies"]):
        color = f"C{index}"
        runs = [r for r in results["runs"] if r["strategy"] == strategy]
        for kind, style in (("soft", "-"), ("hard", "--")):
            agreement = [
                float(np.mean([s["agreement"] for s in r["surrogates"] if s["kind"] == kind])) * 100
                for r in runs
            ]
            stolen = [
                100
                * float(
                    np.mean(
                        [s["scan"].get("verdict") == "stolen" for s in r["surrogates"] if s["kind"] == kind]
                    )
                )
                for r in runs
            ]
            label = f"{strategy}, {kind} labels"
            left.plot(budgets, agreement, style, marker="o", color=color, label=label)
            right.plot(budgets, stolen, style, marker="o", color=color, label=label)
        flagged = [r["live"]["flagged_after"] for r in runs if r["live"]["flagged_after"] is not None]
        if flagged:
            right.axvline(min(flagged), color=color, linestyle=":", alpha=0.8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("thief's queries through the gateway")
        ax.grid(alpha=0.3)
    left.set_ylabel("agreement with the victim, % (mean over families)")
    right.set_ylabel("surrogates called stolen by the scan, %")
    right.set_ylim(-5, 105)
    right.set_title("dotted: the strategy's thief flagged live after this many queries", fontsize=8)
    left.legend(fontsize=6, ncol=2)
    fig.suptitle("modelprint against extraction strategies (ECG victim)")
    fig.tight_layout()
    return save_figure(fig, out_dir / "attacks.png")


def write_outputs(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write table.md, results.json and attacks.png into out_dir; returns the paths."""
    return [*write_table_and_results(results, render_table(results), out_dir), plot_results(results, out_dir)]
