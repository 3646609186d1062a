"""What the paper experiment and the attack suite share: the stack, thieves' surrogates, scans, statistics."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.multioutput import MultiOutputRegressor
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from modelprint.client import ApiCallError, GatewayClient, OperatorClient
from modelprint.training import fit_quietly, mlp_pipeline
from modelprint.v2server import V2Server
from shared.config import Settings
from shared.fingerprint import LOG_EPSILON, SCHEMES, NoFingerprintScheme, get_scheme

# Model families of thieves and of independent companies.
FAMILIES = ("mlp", "random-forest", "logistic-regression", "k-nn", "gradient-boosting")
LABEL_KINDS = ("soft", "hard")
# The experiment's own stack uses this fixed, published fingerprint key so that a run is reproducible
# to the last p-value (a deployment generates a secret one). No thief or model ever sees it.
EXPERIMENT_KEY = hashlib.sha256(b"modelprint experiment key").hexdigest()
# The fingerprint schemes an experiment can run its stack with (a scan of an unmarked API means nothing).
EXPERIMENT_SCHEMES = tuple(name for name in SCHEMES if name != NoFingerprintScheme.name)
Predictor = Callable[[np.ndarray], np.ndarray]


# -- the stack ------------------------------------------------------------------------------------------


def check_scheme(scheme: str, settings: Settings | None) -> None:
    """Fail early on a scheme no experiment can use, or one a running stack does not fingerprint with."""
    if scheme not in EXPERIMENT_SCHEMES:
        raise ValueError(f"unknown fingerprint scheme {scheme!r}; known: {', '.join(EXPERIMENT_SCHEMES)}")
    if settings is not None and settings.fingerprint_scheme != scheme:
        raise ValueError(
            f"the running stack fingerprints with {settings.fingerprint_scheme!r}, not {scheme!r} "
            f"(pass --scheme {settings.fingerprint_scheme}, or run without --use-running)"
        )


def trial_count(trials: int | None, quick: bool) -> int:
    """The number of trials asked for (``--trials``), else 5 (quick: 1); at least 1."""
    count = trials or (1 if quick else 5)
    if count < 1:
        raise ValueError("--trials must be at least 1")
    return count


def fingerprint_of(settings: Settings) -> dict[str, Any]:
    """The scheme the stack fingerprints with and its effective alpha (the scheme's default when unset)."""
    scheme = get_scheme(settings.fingerprint_scheme, settings.fingerprint_alpha)
    return {"scheme": scheme.name, "alpha": getattr(scheme, "alpha", None)}


@contextmanager
def experiment_stack(
    settings: Settings | None, scheme: str, env: dict[str, str] | None = None
) -> Iterator[Settings]:
    """Use the running stack these settings point at, or start one on a fresh data dir and free ports.

    The own stack fingerprints with ``scheme`` (MODELPRINT_FINGERPRINT_SCHEME), may scan suspects on
    127.0.0.1, uses EXPERIMENT_KEY, and gets ``env`` on top. A running stack must use ``scheme``.
    """
    check_scheme(scheme, settings)
    if settings is not None:
        yield settings
        return
    from modelprint.stack import Stack, StackOptions
    from shared.embedded import free_port

    overrides = {
        "MODELPRINT_SCAN_ALLOWED_HOSTS": "127.0.0.1",
        "MODELPRINT_FINGERPRINT_KEYS": json.dumps({"experiment": EXPERIMENT_KEY}),
        "MODELPRINT_FINGERPRINT_SCHEME": scheme,
        **(env or {}),
    }
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)  # the services are started with this process's environment
    data_dir = Path(tempfile.mkdtemp(prefix="modelprint-experiment-"))
    own = Settings(data_dir=data_dir, gateway_port=free_port(), auditor_port=free_port())
    assert own.fingerprint_scheme == scheme, own.fingerprint_scheme
    stack = Stack(own, StackOptions(with_beat=True))
    print(f"[stack] starting modelprint on {data_dir} (embedded Redis and PostgreSQL unless configured)")
    try:
        stack.start()
        print(f"[stack] gateway {own.gateway_url}, operator API {own.auditor_url}", flush=True)
        yield own
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        print("[stack] stopped", flush=True)


def warm_up(
    settings: Settings, operator: OperatorClient, model: str, row: np.ndarray, timeout: float = 120.0
) -> None:
    """Answer a few requests for a freshly deployed model, so the workers have loaded it before we measure.

    A worker loads a model version from PostgreSQL on its first request; on a loaded machine that can
    take longer than the gateway's predict timeout (504), which would otherwise hit a thief's first batch.
    """
    client = operator.create_client(f"{model}-warm-up")
    deadline = time.monotonic() + timeout
    answered = 0
    with GatewayClient(settings.gateway_url, client["api_key"]) as gateway:
        while answered < 4:
            try:
                gateway.predict(model, [row.tolist()])
                answered += 1
            except ApiCallError as exc:
                if exc.status_code != 504 or time.monotonic() > deadline:
                    raise


# -- thieves and independent models -------------------------------------------------------------------


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def make_classifier(family: str, seed: int) -> Any:
    """A classifier of the family, as a thief on top-1 labels or an independent company would train it."""
    if family == "mlp":
        return mlp_pipeline((64, 32), seed)
    if family == "random-forest":
        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    if family == "logistic-regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if family == "k-nn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    if family == "gradient-boosting":
        return HistGradientBoostingClassifier(random_state=seed)
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def make_regressor(family: str, seed: int) -> Any:
    """The family's regressor for distillation: it learns the returned log-probabilities (soft labels)."""
    if family == "mlp":
        return make_pipeline(
            StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 32), max_iter=1000, random_state=seed)
        )
    if family == "random-forest":
        return RandomForestRegressor(n_estimators=100, random_state=seed, n_jobs=1)
    if family == "logistic-regression":
        # A linear model of the log-probabilities, answered through a softmax: multinomial logistic
        # regression fitted to soft targets.
        return make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    if family == "k-nn":
        return make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=5))
    if family == "gradient-boosting":
        return MultiOutputRegressor(HistGradientBoostingRegressor(random_state=seed))
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def aligned_proba(model: Any, classes: list[str]) -> Predictor:
    """predict_proba with one column per victim class (a model may never have seen some class)."""
    columns = [classes.index(str(c)) for c in model.classes_]

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], len(classes)))
        out[:, columns] = model.predict_proba(rows)
        return out

    return predict_proba


def train_classifier(
    family: str, seed: int, X: np.ndarray, labels: np.ndarray, classes: list[str]
) -> Predictor:
    """Fit a classifier on labels; a single-class training set gives a constant answer."""
    present = np.unique(labels)
    if present.size < 2:
        constant = np.zeros(len(classes))
        constant[classes.index(str(present[0]))] = 1.0
        return lambda rows: np.tile(constant, (rows.shape[0], 1))
    return aligned_proba(fit_quietly(make_classifier(family, seed), X, labels), classes)


def train_surrogate(
    family: str,
    kind: str,
    seed: int,
    X: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
) -> Predictor:
    """A thief's surrogate from its stolen answers: soft (distilled from the probabilities) or hard labels."""
    if kind == "hard":
        return train_classifier(family, seed, X, labels, classes)
    if kind != "soft":
        raise ValueError(f"unknown label kind {kind!r}")
    model = fit_quietly(make_regressor(family, seed), X, np.log(probabilities + LOG_EPSILON))
    return lambda rows: _softmax_rows(np.asarray(model.predict(rows)).reshape(rows.shape[0], -1))


def score(
    predict: Predictor, classes: list[str], victim: Any, X_test: np.ndarray, y_test: np.ndarray
) -> dict[str, float]:
    """Accuracy on the test set and agreement with the victim's labels there."""
    labels = np.asarray(classes)[np.argmax(predict(X_test), axis=1)]
    victim_labels = np.asarray(victim.predict(X_test)).astype(str)
    return {
        "accuracy": float(np.mean(labels == np.asarray(y_test).astype(str))),
        "agreement": float(np.mean(labels == victim_labels)),
    }


# -- scans ------------------------------------------------------------------------------------------------


@dataclass
class PendingScan:
    server: V2Server
    scan_id: int
    record: dict[str, Any]


@dataclass
class Scanner:
    """Serves suspects on 127.0.0.1, asks the operator API to scan them, and collects the verdicts."""

    operator: OperatorClient
    model: str
    classes: list[str]
    pending: list[PendingScan] = field(default_factory=list)

    def submit(
        self, name: str, predict_proba: Predictor, client_id: int | None, record: dict[str, Any]
    ) -> None:
        """Serve the suspect and queue its scan; ``record["scan"]`` is filled by :meth:`collect`."""
        server = V2Server(name, predict_proba, self.classes).start()
        try:
            suspect = self.operator.create_suspect(
                {
                    "name": name,
                    "url": server.url,
                    "protocol": "v2",
                    "model": self.model,
                    "remote_model": name,
                    "suspected_client_id": client_id,
                }
            )
            scan = self.operator.scan_suspect(suspect["id"])
        except BaseException:
            server.stop()
            raise
        record["scan"] = {"id": scan["id"], "status": scan["status"]}
        self.pending.append(PendingScan(server, scan["id"], record))

    def collect(self, progress: bool, stall_timeout: float = 600.0) -> None:
        """Wait for every scan, fill its record, stop the servers; fail if nothing moves for long."""
        left = list(self.pending)
        last_change = time.monotonic()
        with tqdm(total=len(left), desc="scans", unit="scan", disable=not progress) as bar:
            try:
                while left:
                    still = []
                    for item in left:
                        scan = self.operator.get_scan(item.scan_id)
                        if scan["status"] in ("done", "failed"):
                            item.record["scan"] = self._summary(scan)
                            item.server.stop()
                            bar.update()
                            last_change = time.monotonic()
                        else:
                            still.append(item)
                    left = still
                    if left and time.monotonic() - last_change > stall_timeout:
                        raise RuntimeError(f"no scan finished for {stall_timeout:.0f} s; {len(left)} left")
                    if left:
                        time.sleep(1.0)
            finally:
                self.stop()
        self.pending = []

    def stop(self) -> None:
        """Stop every suspect's server still running."""
        for item in self.pending:
            item.server.stop()

    def _summary(self, scan: dict[str, Any]) -> dict[str, Any]:
        tests = {
            test["name"].split("[")[0]: {
                "p_value": test["p_value"],
                "p_value_adjusted": test.get("p_value_adjusted"),
                "statistic": test["statistic"],
                "applicable": test["applicable"],
            }
            for test in scan.get("tests") or []
        }
        # The level the auditor decided at is in the scan's report, not in its summary.
        level = json.loads(self.operator.scan_report(scan["id"], "json")).get("level")
        return {
            "id": scan["id"],
            "status": scan["status"],
            "verdict": scan["verdict"],
            "p_value": scan["p_value"],
            "level": level,
            "probes": scan["probes"],
            "error": scan["error"],
            "tests": tests,
        }


def scan_level(records: list[dict[str, Any]]) -> float | None:
    """The decision level the auditor reported (the same for every scan of a run)."""
    levels = {r["scan"]["level"] for r in records if r["scan"].get("level") is not None}
    if len(levels) > 1:
        raise RuntimeError(f"scans were decided at different levels: {sorted(levels)}")
    return levels.pop() if levels else None


def scan_test_names(records: list[dict[str, Any]]) -> list[str]:
    """The scan tests that ran, in the auditor's order (taken from the results, never assumed)."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record["scan"].get("tests", {})))
    return list(names)


# -- statistics -----------------------------------------------------------------------------------------


def describe(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min, max and n."""
    return {
        "mean": float(np.mean(values)),
        "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "n": len(values),
    }


def upper_95(k: int, n: int) -> float | None:
    """One-sided 95% Clopper-Pearson upper bound of a rate seen k times in n."""
    if n == 0:
        return None
    return 1.0 if k >= n else float(stats.beta.ppf(0.95, k + 1, n - k))


def fingerprint_text(fingerprint: dict[str, Any]) -> str:
    """How a table names the scheme a run was measured with."""
    alpha = fingerprint.get("alpha")
    return f"scheme `{fingerprint['scheme']}`" + ("" if alpha is None else f", alpha {alpha:g}")


def p_text(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def write_table_and_results(results: dict[str, Any], table: str, out_dir: Path) -> list[Path]:
    """Write ``table.md`` and ``results.json`` (every number) into out_dir, created if needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / "table.md"
    table_path.write_text(table)
    data_path = out_dir / "results.json"
    data_path.write_text(json.dumps(results, indent=2, default=float))
    return [table_path, data_path]


def save_figure(fig: Any, path: Path) -> Path:
    """Save a laid-out matplotlib figure as a PNG (120 dpi) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
