"""`modelprint demo`: the whole story on the embedded stack, from a fingerprinted answer to a theft verdict.

1. train and deploy the paper's ECG model; 2. create an honest client and a thief; 3. the honest
client sends ordinary traffic, the thief extracts the model through the gateway and serves a
surrogate on 127.0.0.1 (Open Inference Protocol); 4. an independent company serves its own model;
5. the operator registers both as suspects and scans them; 6. alerts, verdicts and reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from modelprint.attacks import ecg_sampler, natural_queries, perturbation_pair_queries
from modelprint.client import GatewayClient, OperatorClient
from modelprint.stack import AlreadyRunningError, Stack
from modelprint.v2server import V2Server
from shared.config import Settings, load_secrets
from shared.ecg import generate_ecg
from shared.fingerprint import get_scheme

THIEF_QUERIES = 1500
HONEST_QUERIES = 600
BATCH = 50
SURROGATE = "thief's surrogate"
INDEPENDENT = "independent company"


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


@contextmanager
def running_stack(settings: Settings, keep_running: bool) -> Iterator[Stack | None]:
    """Use a stack already running on this data dir, or start one for the demo (and stop it after)."""
    # The demo's suspects are served on 127.0.0.1, which the scan SSRF guard refuses unless allowed.
    os.environ.setdefault("MODELPRINT_SCAN_ALLOWED_HOSTS", "127.0.0.1")
    stack = Stack(settings)
    try:
        stack.start()
    except AlreadyRunningError:
        _say("stack", f"using the modelprint already running on {settings.data_dir}")
        yield None
        return
    _say("stack", f"started: gateway {settings.gateway_url}, operator API {settings.auditor_url}")
    try:
        yield stack
        if keep_running:
            _say("stack", "still running (Ctrl-C to stop)")
            stack.supervise()
    finally:
        stack.stop()
        _say("stack", f"stopped; data kept in {settings.data_dir}")


def _wait_for_scan(operator: OperatorClient, scan_id: int, label: str) -> dict[str, Any]:
    with tqdm(desc=f"scanning {label}", bar_format="{desc}: {elapsed}", leave=False) as progress:
        while True:
            scan = operator.get_scan(scan_id)
            if scan["status"] in ("done", "failed"):
                return scan
            time.sleep(0.5)
            progress.update()


def run_demo(settings: Settings, keep_running: bool = False) -> int:
    """Run the whole story; returns 0 when every outcome is the expected one."""
    from modelprint.training import save_model, save_reference_data, train_ecg_model

    started = time.monotonic()
    _say(
        "1/6", f"starting modelprint on {settings.data_dir} (embedded Redis and PostgreSQL unless configured)"
    )
    with running_stack(settings, keep_running):
        secrets = load_secrets(settings)
        operator = OperatorClient(settings.auditor_url, secrets.admin_token)
        _say("1/6", "training the paper's model: synthetic ECG (1,200 x 80, 4 rhythms), MLP (64, 32)")
        trained = train_ecg_model()
        models_dir = settings.data_dir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        model_path, reference_path = models_dir / "ecg-mlp.skops", models_dir / "ecg-mlp-reference.npz"
        sha256 = save_model(trained.estimator, model_path)
        save_reference_data(trained.X_test, trained.y_test, reference_path)
        deployed = operator.deploy_model("ecg-mlp", model_path, reference_path)
        _say(
            "1/6",
            f"test accuracy {trained.test_accuracy:.2%}; deployed ecg-mlp v{deployed['version']} "
            f"(sha256 {sha256[:16]}...)",
        )

        honest = operator.create_client("st-marys-hospital")
        thief = operator.create_client("shady-startup")
        _say("2/6", f"clients: honest #{honest['id']} {honest['name']}, thief #{thief['id']} {thief['name']}")

        honest_rows = natural_queries(ecg_sampler(np.random.default_rng(11)), HONEST_QUERIES)
        with GatewayClient(settings.gateway_url, honest["api_key"]) as gateway:
            labels, returned = gateway.predict_rows("ecg-mlp", honest_rows, BATCH, "honest traffic")
        clean = trained.estimator.predict_proba(honest_rows)
        expected = get_scheme(settings.fingerprint_scheme, settings.fingerprint_alpha).apply(
            clean, honest_rows, secrets.active_key
        )
        same_labels = bool(np.array_equal(labels, trained.estimator.predict(honest_rows)))
        fingerprinted = bool(np.allclose(returned, expected.probabilities, atol=1e-12))
        _say(
            "3/6",
            f"honest client: {HONEST_QUERIES} ECG windows answered; labels identical to the model's: "
            f"{same_labels}; probabilities carry the keyed fingerprint: {fingerprinted}",
        )

        # The thief has a few hundred recordings of its own, not the hospital's data, and stretches them
        # the usual way: each recording, then a slightly perturbed copy (local boundary probing).
        own_recordings = natural_queries(ecg_sampler(np.random.default_rng(22)), THIEF_QUERIES // 2)
        thief_rows = perturbation_pair_queries(own_recordings, THIEF_QUERIES, np.random.default_rng(23))
        with GatewayClient(settings.gateway_url, thief["api_key"]) as gateway:
            stolen_labels, _ = gateway.predict_rows("ecg-mlp", thief_rows, BATCH, "thief extracting")
        surrogate = make_pipeline(
            StandardScaler(), MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=1000, random_state=3)
        )
        surrogate.fit(thief_rows, stolen_labels)
        surrogate_accuracy = float(surrogate.score(trained.X_test, trained.y_test))
        agreement = float(
            np.mean(surrogate.predict(trained.X_test) == trained.estimator.predict(trained.X_test))
        )
        classes = [str(c) for c in deployed["classes"]]
        thief_server = V2Server("ecg", surrogate.predict_proba, classes).start()
        _say(
            "3/6",
            f"thief: {THIEF_QUERIES} queries ({THIEF_QUERIES // 2} own recordings + perturbed copies), "
            f"surrogate accuracy {surrogate_accuracy:.2%}, agreement with "
            f"ours {agreement:.2%}; serving it at {thief_server.url} (Open Inference Protocol)",
        )

        company_X, company_y = generate_ecg(1200, seed=7)
        independent = RandomForestClassifier(n_estimators=200, random_state=0).fit(company_X, company_y)
        company_server = V2Server("heart-rhythm", independent.predict_proba, classes).start()
        independent_accuracy = float(independent.score(trained.X_test, trained.y_test))
        _say(
            "4/6",
            f"independent company: its own 1,200 recordings, random forest, accuracy "
            f"{independent_accuracy:.2%}; serving it at {company_server.url}",
        )

        try:
            verdicts = {}
            for label, server, client_id in (
                (SURROGATE, thief_server, thief["id"]),
                (INDEPENDENT, company_server, None),
            ):
                suspect = operator.create_suspect(
                    {
                        "name": label,
                        "url": server.url,
                        "protocol": "v2",
                        "model": "ecg-mlp",
                        "remote_model": server.name,
                        "suspected_client_id": client_id,
                    }
                )
                scan = _wait_for_scan(operator, operator.scan_suspect(suspect["id"])["id"], label)
                verdicts[label] = scan
                outcome = (
                    f"verdict {scan['verdict']}, p-value {scan['p_value']:.3g}"
                    if scan["status"] == "done"
                    else f"failed: {scan['error']}"
                )
                _say("5/6", f"scan of the {label}: {outcome}")
        finally:
            thief_server.stop()
            company_server.stop()

        deadline = time.monotonic() + 30
        alerts: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            alerts = operator.list_alerts(status="open")
            kinds = {(a["kind"], a["subject"]["id"]) for a in alerts}
            if ("extraction_suspected", str(thief["id"])) in kinds:
                break
            time.sleep(1)
        _say("6/6", "open alerts:")
        for alert in alerts:
            print(f"      #{alert['id']} [{alert['severity']}] {alert['kind']}: {alert['message'][:150]}")
        reports_dir = settings.data_dir / "reports"
        reports_dir.mkdir(exist_ok=True)
        for label, scan in verdicts.items():
            path = reports_dir / f"scan-{scan['id']}.html"
            path.write_text(operator.scan_report(scan["id"]))
            print(f"      evidence report for the {label}: {path}")
        operator.close()

    def about_client(alert: dict[str, Any], client: dict[str, Any]) -> bool:
        return bool(alert["subject"]["type"] == "client" and alert["subject"]["id"] == str(client["id"]))

    thief_flagged = any(a["kind"] == "extraction_suspected" and about_client(a, thief) for a in alerts)
    honest_flagged = any(about_client(a, honest) for a in alerts)
    ok = (
        same_labels
        and fingerprinted
        and thief_flagged
        and not honest_flagged
        and verdicts[SURROGATE]["verdict"] == "stolen"
        and verdicts[INDEPENDENT]["verdict"] != "stolen"
    )
    print(
        "\nsummary: "
        f"labels unchanged {same_labels}; thief flagged while extracting {thief_flagged}; honest client "
        f"flagged {honest_flagged}; surrogate verdict {verdicts[SURROGATE]['verdict']}; "
        f"independent model verdict {verdicts[INDEPENDENT]['verdict']}; "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0 if ok else 1
