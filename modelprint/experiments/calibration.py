"""`modelprint experiment calibrate`: the offline calibration of the scans' ``output_replay`` test.

``output_replay`` asks whether a suspect's probabilities are much closer to ours on a thief's own queries
than on fresh control inputs, beyond what the auditor's independent reference models show. Its null is
"one more independent model": Student's t with k - 1 degrees of freedom around the k reference models'
contrasts, scaled by sqrt(s^2 (1 + 1/k) + B^2), where B (``OUTPUT_REPLAY_BIAS_SD``) allows for the
reference models' bias. This experiment measures that null where the truth is known, without a stack:

For each trial the victim of ``experiment paper`` is trained (same seeds), the auditor's reference kit is
built from its test set exactly as the auditor builds it, and for each thief budget the thief's queries
(the paper run's query seeds) are answered with the fingerprint scheme and the published experiment key,
in process, as the inference workers do. Then ``output_replay`` is computed, with the auditor's own
function, for

- **independent models** (every family of ``FAMILIES``, several seeds, each on its own independent data,
  true labels only, never our answers), which must not be flagged, and
- **soft-label surrogates** distilled from the thief's fingerprinted answers, which should be.

Every test's observed statistic and the reference models' null sample are kept, so the p-value under
other nulls (other allowances B, the normal fit used before the t null) is recomputed from them without
training anything again (:func:`output_replay_p`).

Outputs (``--out``): ``table.md``, ``results.json`` (every test) and ``pvalues.png``.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from modelprint.experiments.common import (
    EXPERIMENT_KEY,
    FAMILIES,
    Predictor,
    check_scheme,
    save_figure,
    train_classifier,
    train_surrogate,
    trial_count,
    write_table_and_results,
)
from modelprint.experiments.paper import (
    DATASETS,
    INDEPENDENT_DATA_SEED_BASE,
    P_FLOOR,
    PAPER_DATA_SEED,
    PAPER_SCHEME,
    PAPER_TRAIN_SEED,
    TrialData,
    thief_seed,
)
from services.auditor.scanstats import (
    OUTPUT_REPLAY_BIAS_SD,
    _decision_p,
    _full_proba,
    _output_replay_test,
    _reference_estimators,
    _victim_proba,
    build_reference_kit,
)
from shared.fingerprint import FingerprintScheme, get_scheme

__all__ = [
    "PLANS",
    "CalibrationConfig",
    "NullVariant",
    "null_variants",
    "output_replay_p",
    "run_calibration",
    "write_outputs",
]

logger = logging.getLogger(__name__)

# The key id the experiment's own stack gives EXPERIMENT_KEY (modelprint.experiments.common).
EXPERIMENT_KEY_ID = "experiment"
# The bias allowances the table compares (the scans' own is added if it is not among them).
ALLOWANCES = (0.0, 0.05, 0.1, 0.15)
# Levels the table counts independent models below; the last is the one surrogates are judged at.
LEVELS = (0.01, 0.001)
INDEPENDENT = "independent"
SURROGATE = "soft-surrogate"


@dataclass(frozen=True)
class CalibrationPlan:
    """Which thief budgets get independent models and soft-label surrogates of which families."""

    independent_budgets: tuple[int, ...]
    surrogate_budgets: tuple[int, ...]
    surrogate_families: tuple[str, ...]

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(sorted({*self.independent_budgets, *self.surrogate_budgets}))


PLANS: dict[str, CalibrationPlan] = {
    "ecg": CalibrationPlan((150, 1500), (50, 150, 400, 1500), FAMILIES),
    "digits": CalibrationPlan((150, 600), (150, 600), ("mlp",)),
}


@dataclass
class CalibrationConfig:
    dataset: str = "ecg"
    trials: int = 5
    quick: bool = False
    # Seeds per independent family and trial (quick: 1).
    independent_seeds: int = 3
    scheme: str = PAPER_SCHEME
    command: str = ""
    progress: bool = True

    @property
    def plan(self) -> CalibrationPlan:
        """The data set's plan; quick keeps only the first budget with independent models."""
        plan = PLANS[self.dataset]
        if not self.quick:
            return plan
        budget = plan.independent_budgets[0]
        surrogate_budgets = (budget,) if budget in plan.surrogate_budgets else ()
        return CalibrationPlan((budget,), surrogate_budgets, plan.surrogate_families)

    @classmethod
    def make(
        cls, dataset: str = "ecg", trials: int | None = None, quick: bool = False, **kwargs: Any
    ) -> CalibrationConfig:
        """The defaults (5 trials, 3 seeds per family) or the quick ones (1 trial, 1 budget, 1 seed)."""
        if dataset not in PLANS:
            raise ValueError(f"no calibration plan for data set {dataset!r}; known: {', '.join(PLANS)}")
        if quick:
            kwargs.setdefault("independent_seeds", 1)
        config = cls(dataset=dataset, trials=trial_count(trials, quick), quick=quick, **kwargs)
        check_scheme(config.scheme, None)
        return config


# -- the null under other assumptions -----------------------------------------------------------------------


@dataclass(frozen=True)
class NullVariant:
    """A null for the output-replay contrast: Student's t with bias allowance B, or a plain normal fit."""

    allowance: float | None  # None: the normal fit

    @property
    def label(self) -> str:
        if self.allowance is None:
            return "normal fit Φ((x − m)/s), no allowance"
        return f"t (k − 1 df), allowance B = {self.allowance:g}"

    @property
    def used_by_scans(self) -> bool:
        return self.allowance == OUTPUT_REPLAY_BIAS_SD


def null_variants() -> list[NullVariant]:
    """The allowances compared (including the scans' own), then the normal fit."""
    allowances = sorted({*ALLOWANCES, OUTPUT_REPLAY_BIAS_SD})
    return [*(NullVariant(b) for b in allowances), NullVariant(None)]


def output_replay_p(observed: float, null: Sequence[float], allowance: float | None) -> float:
    """The output-replay p-value of ``observed`` against the reference models' contrasts ``null``.

    With an allowance B: Student's t with k - 1 degrees of freedom around the null's mean, scaled by
    sqrt(s^2 (1 + 1/k) + B^2) (the scans' null for B = OUTPUT_REPLAY_BIAS_SD). With ``None``: a normal
    fit, Φ((observed - mean) / s). s is the null's sample standard deviation (ddof 1). As in the scans, the
    parametric tail counts below the empirical floor (1 + #null <= observed) / (k + 1) only when every
    reference contrast is above the observed one.
    """
    sample = np.asarray(null, dtype=np.float64)
    k = sample.size
    if k < 3:
        raise ValueError(f"a null sample of {k} contrasts; the scans need at least 3")
    mean = float(sample.mean())
    variance = float(np.var(sample, ddof=1))
    if allowance is None:
        sd = math.sqrt(variance)
    else:
        sd = math.sqrt(variance * (1 + 1 / k) + allowance**2)
    if sd > 0:
        z = (observed - mean) / sd
    else:
        z = 0.0 if observed >= mean else -math.inf
    parametric = float(stats.norm.cdf(z) if allowance is None else stats.t.cdf(z, df=k - 1))
    empirical = (1 + int(np.sum(sample <= observed))) / (k + 1)
    return _decision_p(parametric, empirical, bool(np.all(sample > observed)))


# -- the run ------------------------------------------------------------------------------------------------


def _query_seeds(dataset: str, trial: int, budgets: Sequence[int]) -> dict[int, int]:
    """The paper run's query seed for its budgets; other budgets take the indices after the paper's."""
    paper = DATASETS[dataset].budgets
    extra = [b for b in PLANS[dataset].budgets if b not in paper]
    return {
        b: thief_seed(trial, paper.index(b) if b in paper else len(paper) + extra.index(b)) for b in budgets
    }


def _models_per_trial(config: CalibrationConfig, reference_models: int) -> int:
    plan = config.plan
    return (
        1  # the victim
        + reference_models
        + config.independent_seeds * len(FAMILIES)
        + len(plan.surrogate_budgets) * len(plan.surrogate_families)
    )


def _run_trial(
    trial: int,
    data: TrialData,
    config: CalibrationConfig,
    scheme: FingerprintScheme,
    key: bytes,
    bar: tqdm,
) -> list[dict[str, Any]]:
    """Every output-replay test of one trial: independent models and soft surrogates, per thief budget."""
    plan = config.plan
    victim = data.victim
    classes = [str(c) for c in victim.estimator.classes_]
    n = len(classes)
    # The auditor's kit: built from the reference data deployed with the victim (its test set), seed 0.
    kit = build_reference_kit(victim.X_test, np.asarray(victim.y_test).astype(str), classes, seed=0)
    bar.update(len(kit.models))
    control = kit.control_inputs
    victim_control = _victim_proba(victim.estimator, control, n)
    ref_control = [_full_proba(model, control, n) for model in kit.models]

    independents: list[tuple[dict[str, Any], Predictor]] = []
    for k in range(config.independent_seeds):
        for f_index, family in enumerate(FAMILIES):
            data_seed = INDEPENDENT_DATA_SEED_BASE + 1000 * trial + 10 * k + f_index
            X, y = data.independent_data(data_seed)
            predict = train_classifier(family, k, X, np.asarray(y).astype(str), classes)
            independents.append(
                ({"kind": INDEPENDENT, "family": family, "seed": k, "data_seed": data_seed}, predict)
            )
            bar.update()

    records: list[dict[str, Any]] = []
    for budget, query_seed in _query_seeds(config.dataset, trial, plan.budgets).items():
        rows = data.thief_queries(budget, query_seed)
        victim_rows = _victim_proba(victim.estimator, rows, n)
        ref_rows = [_full_proba(model, rows, n) for model in kit.models]
        suspects = list(independents) if budget in plan.independent_budgets else []
        if budget in plan.surrogate_budgets:
            # What the thief got back from our gateway: the fingerprinted answers and their top-1 labels.
            answers = scheme.apply(victim_rows, rows, key).probabilities
            labels = np.asarray(classes)[np.argmax(answers, axis=1)]
            for family in plan.surrogate_families:
                predict = train_surrogate(family, "soft", victim.train_seed, rows, labels, answers, classes)
                suspects.append(({"kind": SURROGATE, "family": family, "seed": victim.train_seed}, predict))
                bar.update()
        for meta, predict in suspects:
            test = _output_replay_test(
                "output_replay",
                predict(rows),
                victim_rows,
                predict(control),
                victim_control,
                ref_rows,
                ref_control,
            )
            if not test.applicable or test.observed is None or test.p_value is None:
                raise RuntimeError(f"output_replay not applicable to {meta}: {test.explanation}")
            records.append(
                {
                    "trial": trial,
                    "budget": budget,
                    "query_seed": query_seed,
                    **meta,
                    "observed": test.observed,
                    "p_value": test.p_value,
                    "p_value_parametric": test.p_value_parametric,
                    "null": test.null_samples,
                }
            )
    independent_ps = [r["p_value"] for r in records if r["kind"] == INDEPENDENT]
    logger.info(
        "calibration trial done",
        extra={
            "dataset": config.dataset,
            "trial": trial,
            "tests": len(records),
            "smallest_independent_p": min(independent_ps, default=None),
        },
    )
    return records


def run_calibration(config: CalibrationConfig) -> dict[str, Any]:
    """Train, answer and test everything; return ``results.json``'s content (writes nothing)."""
    started = time.monotonic()
    plan = config.plan
    scheme = get_scheme(config.scheme)
    key = EXPERIMENT_KEY.encode("utf-8")  # as the experiment's stack loads it (shared.config.load_secrets)
    reference_models = len(_reference_estimators(0))
    tests: list[dict[str, Any]] = []
    logger.info(
        "calibration started",
        extra={
            "dataset": config.dataset,
            "trials": config.trials,
            "scheme": scheme.name,
            "quick": config.quick,
        },
    )
    # One BLAS/OpenMP thread: oversubscribed threads on a small machine slow boosting down many times over.
    with (
        threadpool_limits(limits=1),
        tqdm(
            total=config.trials * _models_per_trial(config, reference_models),
            desc=f"calibration {config.dataset}: models trained",
            unit="model",
            disable=not config.progress,
        ) as bar,
    ):
        for trial in range(config.trials):
            data = DATASETS[config.dataset].make_trial(trial)
            bar.update()
            tests += _run_trial(trial, data, config, scheme, key, bar)
    results: dict[str, Any] = {
        "setting": "calibrate",
        "dataset": config.dataset,
        "command": config.command,
        "quick": config.quick,
        "trials_run": config.trials,
        "plan": {
            "independent_budgets": list(plan.independent_budgets),
            "surrogate_budgets": list(plan.surrogate_budgets),
            "surrogate_families": list(plan.surrogate_families),
            "independent_families": list(FAMILIES),
            "independent_seeds": config.independent_seeds,
        },
        "fingerprint": {
            "scheme": scheme.name,
            "alpha": getattr(scheme, "alpha", None),
            "key_id": EXPERIMENT_KEY_ID,
        },
        "seeds": (
            f"trial t: victim data seed {PAPER_DATA_SEED}+t, training seed {PAPER_TRAIN_SEED}+t (as "
            "`experiment paper`); thief of budget b: the paper run's query seed for b, budgets the paper "
            "does not run take the next indices; independent model k of family f: data seed "
            f"{INDEPENDENT_DATA_SEED_BASE}+1000t+10k+f, model seed k; surrogates: the trial's training seed; "
            "reference kit seed 0 (as the auditor)"
        ),
        "scans_bias_allowance": OUTPUT_REPLAY_BIAS_SD,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "tests": tests,
        "runtime_seconds": round(time.monotonic() - started, 1),
    }
    results["summary"] = summarise(results)
    return results


# -- summary, table, plot ---------------------------------------------------------------------------


def _p_under(record: dict[str, Any], variant: NullVariant) -> float:
    """The scans' own p-value for their null; recomputed from the stored null sample for the others."""
    if variant.used_by_scans:
        return float(record["p_value"])
    return output_replay_p(record["observed"], record["null"], variant.allowance)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    tests = results["tests"]
    independents = [r for r in tests if r["kind"] == INDEPENDENT]
    surrogates = [r for r in tests if r["kind"] == SURROGATE]
    level = LEVELS[-1]
    variants = []
    for variant in null_variants():
        ps = [_p_under(r, variant) for r in independents]
        caught: dict[str, dict[str, dict[str, int]]] = {}
        for r in surrogates:
            cell = caught.setdefault(str(r["budget"]), {}).setdefault(r["family"], {"caught": 0, "n": 0})
            cell["n"] += 1
            cell["caught"] += int(_p_under(r, variant) < level)
        variants.append(
            {
                "label": variant.label,
                "allowance": variant.allowance,
                "used_by_scans": variant.used_by_scans,
                "independent": {
                    "n": len(ps),
                    "smallest_p": min(ps, default=None),
                    **{f"below_{lv:g}": sum(p < lv for p in ps) for lv in LEVELS},
                },
                "surrogates_caught": caught,
            }
        )
    # The recomputation reproduces the scans' own p-value (checked here on every test of the run).
    scans = NullVariant(OUTPUT_REPLAY_BIAS_SD)
    gaps = [
        abs(output_replay_p(r["observed"], r["null"], scans.allowance) - r["p_value"])
        / max(r["p_value"], 1e-300)
        for r in tests
    ]
    return {
        "independent_tests": len(independents),
        "independent_models": len({(r["trial"], r["family"], r["seed"]) for r in independents}),
        "surrogate_tests": len(surrogates),
        "surrogate_level": level,
        "recomputed_vs_scan_max_relative_difference": max(gaps, default=0.0),
        "variants": variants,
    }


def _p_cell(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def render_table(results: dict[str, Any]) -> str:
    s = results["summary"]
    plan = results["plan"]
    fingerprint = results["fingerprint"]
    level = s["surrogate_level"]
    lines = [
        f"# modelprint experiment calibrate: output_replay on {results['dataset']}",
        "",
        f"{results['trials_run']} trial(s), offline (no stack): the `experiment paper` victims and thieves "
        f"(scheme `{fingerprint['scheme']}`, alpha {fingerprint['alpha']:g}, the published experiment key), "
        "the auditor's reference kit and its own `output_replay` function. "
        f"Runtime {results['runtime_seconds']:.0f} s. Command: `{results['command'] or '-'}`.",
        f"Seeds: {results['seeds']}.",
        "",
        f"Independent models: {s['independent_models']} ({', '.join(plan['independent_families'])}; "
        f"{plan['independent_seeds']} seed(s) each per trial, own data, true labels only), each tested "
        f"against the thieves with {', '.join(f'{b:,}' for b in plan['independent_budgets'])} queries: "
        f"{s['independent_tests']} tests. p-values are unadjusted (a scan Holm-adjusts over all its tests). "
        "Every null keeps the scans' empirical floor: unless the statistic is below all k reference "
        "models' values, p >= 2/(k + 1).",
        "",
        "| null | independent tests | smallest p | "
        + " | ".join(f"p < {lv:g}" for lv in LEVELS)
        + f" | soft surrogates caught (p < {level:g}) |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in LEVELS) + " | ---: |",
    ]
    for v in s["variants"]:
        caught = sum(c["caught"] for by in v["surrogates_caught"].values() for c in by.values())
        label = f"**{v['label']} (the scans' null)**" if v["used_by_scans"] else v["label"]
        ind = v["independent"]
        cells = [label, str(ind["n"]), _p_cell(ind["smallest_p"])]
        cells += [str(ind[f"below_{lv:g}"]) for lv in LEVELS]
        cells.append(f"{caught}/{s['surrogate_tests']}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Soft-label surrogates caught by `output_replay` alone (p < {level:g}) per thief budget and family, "
        "under each null (one surrogate per trial):",
        "",
        "| queries | family | "
        + " | ".join(
            (
                "**B = scans**"
                if v["used_by_scans"]
                else ("normal fit" if v["allowance"] is None else f"B = {v['allowance']:g}")
            )
            for v in s["variants"]
        )
        + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in s["variants"]) + " |",
    ]
    for budget in plan["surrogate_budgets"]:
        for family in plan["surrogate_families"]:
            cells = [f"{budget:,}", family]
            for v in s["variants"]:
                c = v["surrogates_caught"].get(str(budget), {}).get(family)
                cells.append("-" if c is None else f"{c['caught']}/{c['n']}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The scans use B = {results['scans_bias_allowance']:g} (`OUTPUT_REPLAY_BIAS_SD`); their row is the "
        "p-value `output_replay` itself returned, the other rows are recomputed from each test's stored "
        "statistic and null sample. The recomputation reproduces the scans' p-values to a relative "
        f"difference of {s['recomputed_vs_scan_max_relative_difference']:.1g}.",
        "",
    ]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out_dir: Path) -> Path:
    """Independent models' p-values per family (scans' null, normal fit), the surrogates' for contrast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tests = results["tests"]
    level = results["summary"]["surrogate_level"]
    budgets = sorted({r["budget"] for r in tests})
    colours = {b: plt.get_cmap("viridis")(i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}
    columns = [*FAMILIES, "soft surrogates"]
    panels = [NullVariant(results["scans_bias_allowance"]), NullVariant(None)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    rng = np.random.default_rng(0)  # horizontal jitter only
    for ax, variant in zip(axes, panels, strict=True):
        for index, column in enumerate(columns):
            for r in tests:
                is_column = (
                    r["kind"] == SURROGATE
                    if column == "soft surrogates"
                    else (r["kind"] == INDEPENDENT and r["family"] == column)
                )
                if not is_column:
                    continue
                p = max(_p_under(r, variant), P_FLOOR)
                marker = "x" if r["kind"] == SURROGATE else "o"
                ax.plot(
                    index + rng.uniform(-0.25, 0.25),
                    p,
                    marker,
                    color=colours[r["budget"]],
                    alpha=0.75,
                    markersize=5,
                )
        ax.axhline(level, color="red", linestyle="--", label=f"p = {level:g}")
        ax.axhline(0.01, color="orange", linestyle=":", label="p = 0.01")
        ax.set_yscale("log")
        ax.set_xticks(range(len(columns)), columns, rotation=20, fontsize=8)
        ax.set_title(variant.label + (" (scans)" if variant.used_by_scans else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"output_replay p-value (0 drawn at {P_FLOOR:g})")
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [
        Line2D([], [], linestyle="", marker="s", color=colours[b], label=f"{b:,} queries") for b in budgets
    ]
    axes[0].legend(handles=handles, fontsize=7, loc="lower left")
    fig.suptitle(
        f"{results['dataset']}: output_replay p-values of independent models (o) and soft surrogates (x), "
        f"{results['trials_run']} trial(s)"
    )
    fig.tight_layout()
    return save_figure(fig, out_dir / "pvalues.png")


def write_outputs(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write table.md, results.json and pvalues.png into out_dir; returns the paths."""
    return [*write_table_and_results(results, render_table(results), out_dir), plot_results(results, out_dir)]
