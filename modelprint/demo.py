"""`modelprint demo`: bring the stack up, deploy the paper's ECG model, show a fingerprinted prediction."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from modelprint.client import GatewayClient, OperatorClient
from modelprint.stack import AlreadyRunningError, Stack
from shared.config import Settings, load_secrets
from shared.fingerprint import get_scheme


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


@contextmanager
def running_stack(settings: Settings, keep_running: bool) -> Iterator[Stack | None]:
    """Use a stack already running on this data dir, or start one for the demo."""
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


def run_demo(settings: Settings, keep_running: bool = False) -> int:
    """Walk through one fingerprinted prediction on the embedded stack; returns an exit code."""
    from modelprint.training import save_model, save_reference_data, train_ecg_model

    started = time.monotonic()
    _say(
        "1/5", f"starting modelprint on {settings.data_dir} (embedded Redis and PostgreSQL unless configured)"
    )
    with running_stack(settings, keep_running):
        secrets = load_secrets(settings)
        _say("2/5", "training the paper's model: synthetic ECG (1,200 x 80, 4 rhythms), MLP (64, 32)")
        trained = train_ecg_model()
        models_dir = settings.data_dir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        model_path = models_dir / "ecg-mlp.skops"
        reference_path = models_dir / "ecg-mlp-reference.npz"
        sha256 = save_model(trained.estimator, model_path)
        save_reference_data(trained.X_test, trained.y_test, reference_path)
        with OperatorClient(settings.auditor_url, secrets.admin_token) as operator:
            deployed = operator.deploy_model("ecg-mlp", model_path, reference_path)
            _say(
                "2/5",
                f"test accuracy {trained.test_accuracy:.2%}; deployed ecg-mlp v{deployed['version']} "
                f"(sha256 {sha256[:16]}...)",
            )
            client = operator.create_client("demo-hospital")
            _say("3/5", f"created client {client['id']} ({client['name']}); its API key is shown only once")

            rows = trained.X_test[:5]
            with GatewayClient(settings.gateway_url, client["api_key"]) as gateway:
                answer = gateway.predict("ecg-mlp", rows.tolist())
                v2 = gateway.infer_v2("ecg-mlp", trained.X_test[5:8].tolist())
            returned = np.array([p["probabilities"] for p in answer["predictions"]])
            clean = trained.estimator.predict_proba(rows)
            expected = get_scheme("hmac-second-class").apply(clean, rows, secrets.active_key).probabilities
            _say("4/5", "5 ECG windows through POST /v1/models/ecg-mlp/predict:")
            print(f"      {'true rhythm':<26}{'returned label':<26}{'max |returned - clean|':>24}")
            for index, prediction in enumerate(answer["predictions"]):
                delta = float(np.abs(returned[index] - clean[index]).max())
                print(f"      {trained.y_test[index]:<26}{prediction['label']:<26}{delta:>24.5f}")
            same_labels = [p["label"] for p in answer["predictions"]] == list(trained.estimator.predict(rows))
            print(f"      labels identical to the model's own: {same_labels}")
            print(
                "      probabilities equal the keyed HMAC fingerprint recomputed by the operator: "
                f"{bool(np.allclose(returned, expected, atol=1e-12))}"
            )
            print(f"      Open Inference Protocol (/v2) labels: {v2['outputs'][1]['data']}")

            deadline = time.monotonic() + 20
            stored: list[dict[str, object]] = []
            while time.monotonic() < deadline and len(stored) < 8:
                stored = operator.all_queries(client["id"])
                time.sleep(0.2)
            _say("5/5", f"{len(stored)} of 8 answered rows are in PostgreSQL's audit history for this client")
            if stored:
                record = stored[0]
                print(
                    f"      first record: request {str(record['request_id'])[:12]}..., "
                    f"label {record['label']}, "
                    f"scheme {record['scheme']}, key id {record['key_id']} (never the key)"
                )
    _say("done", f"demo finished in {time.monotonic() - started:.0f} s")
    return 0 if len(stored) == 8 and same_labels else 1
