"""End to end over HTTP: both prediction APIs return the model's labels with the keyed fingerprint."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from shared.fingerprint import DEFAULT_SCHEME, get_scheme
from tests.conftest import DeployedTestModel, RunningStack, wait_until

pytestmark = pytest.mark.e2e


def _expected(model: DeployedTestModel, rows: np.ndarray, stack: RunningStack) -> np.ndarray:
    clean = model.estimator.predict_proba(rows)
    return get_scheme(DEFAULT_SCHEME).apply(clean, rows, stack.secrets.active_key).probabilities


def test_v1_predict_returns_model_labels_and_keyed_fingerprint(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    _, gateway, _ = running_stack.new_client()
    rows = small_model.X[:50]
    with gateway:
        answer = gateway.predict(small_model.name, rows.tolist())
    assert answer["model"] == small_model.name
    assert answer["version"] >= 1
    assert answer["classes"] == list(small_model.estimator.classes_)
    labels = [prediction["label"] for prediction in answer["predictions"]]
    assert labels == list(small_model.estimator.predict(rows))
    returned = np.array([prediction["probabilities"] for prediction in answer["predictions"]])
    clean = small_model.estimator.predict_proba(rows)
    # The answer carries the perturbation (it differs from the clean output) ...
    assert np.abs(returned - clean).max() > 1e-3
    # ... and it is exactly the keyed perturbation the auditor can recompute from the stored input.
    np.testing.assert_allclose(returned, _expected(small_model, rows, running_stack), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(returned.argmax(axis=1), clean.argmax(axis=1))


def test_v2_infer_fp64_and_fp32(running_stack: RunningStack, small_model: DeployedTestModel) -> None:
    _, gateway, _ = running_stack.new_client()
    rows = small_model.X[100:120]
    with gateway:
        answer64 = gateway.infer_v2(small_model.name, rows.tolist(), "FP64")
        answer32 = gateway.infer_v2(small_model.name, rows.tolist(), "FP32")
    outputs = {output["name"]: output for output in answer64["outputs"]}
    assert answer64["model_name"] == small_model.name
    assert outputs["probabilities"]["shape"] == [20, 3]
    assert outputs["probabilities"]["datatype"] == "FP64"
    assert outputs["label"]["datatype"] == "BYTES"
    assert outputs["label"]["data"] == [str(label) for label in small_model.estimator.predict(rows)]
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(20, 3)
    np.testing.assert_allclose(probabilities, _expected(small_model, rows, running_stack), atol=1e-12)
    # FP32 inputs are rounded to float32 before the model and the HMAC see them.
    rows32 = rows.astype(np.float32).astype(np.float64)
    outputs32 = {output["name"]: output for output in answer32["outputs"]}
    probabilities32 = np.array(outputs32["probabilities"]["data"]).reshape(20, 3)
    np.testing.assert_allclose(probabilities32, _expected(small_model, rows32, running_stack), atol=1e-12)


def test_v2_metadata_and_health(running_stack: RunningStack, small_model: DeployedTestModel) -> None:
    _, gateway, _ = running_stack.new_client()
    with gateway:
        metadata = gateway.http.get(f"/v2/models/{small_model.name}").json()
        assert metadata["inputs"][0]["shape"] == [-1, 6]
        assert metadata["outputs"][0]["shape"] == [-1, 3]
        assert gateway.http.get("/v2/health/live").json() == {"live": True}
        assert gateway.http.get("/v2/health/ready").status_code == 200
        assert gateway.http.get(f"/v2/models/{small_model.name}/ready").json()["ready"] is True
        assert gateway.http.get("/v2/models/nope").status_code == 404
        metrics = gateway.http.get("/metrics").text
    assert "modelprint_gateway_requests_total" in metrics
    for admission_metric in (  # admission control is on by default
        "modelprint_gateway_audit_lag_seconds",
        "modelprint_gateway_admission_rate_rows",
        "modelprint_gateway_admitted_rows",
        "modelprint_gateway_admission_refused",
    ):
        assert f"\n{admission_metric} " in metrics


def test_every_answered_row_reaches_postgresql(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, gateway, _ = running_stack.new_client()
    sent: list[np.ndarray] = []
    returned: list[list[float]] = []
    with gateway:
        for start in range(0, 90, 30):
            rows = small_model.X[start : start + 30]
            answer = gateway.predict(small_model.name, rows.tolist())
            sent.append(rows)
            returned.extend(prediction["probabilities"] for prediction in answer["predictions"])
        answer = gateway.infer_v2(small_model.name, small_model.X[200:210].tolist())
        sent.append(small_model.X[200:210])
        returned.extend(np.array(answer["outputs"][0]["data"]).reshape(10, 3).tolist())
    with running_stack.operator() as operator:
        records = wait_until(
            lambda: (found := operator.all_queries(client_id, page_size=40)) and len(found) >= 100 and found,
            timeout=20,
            message="100 answered rows in PostgreSQL",
        )
    assert len(records) == 100
    records.sort(key=lambda record: record["id"])
    stored_inputs = np.array([record["input"] for record in records])
    stored_probabilities = np.array([record["probabilities"] for record in records])
    # Requests are stored in the order they were answered, and rows in their order in the request.
    np.testing.assert_array_equal(stored_inputs, np.vstack(sent))
    np.testing.assert_array_equal(stored_probabilities, np.array(returned))
    assert {record["key_id"] for record in records} == {running_stack.secrets.active_key_id}
    assert {record["scheme"] for record in records} == {DEFAULT_SCHEME}
    assert [record["label"] for record in records[:90]] == [
        str(label) for label in small_model.estimator.predict(np.vstack(sent[:3]))
    ]


def _registry_cache_hits(running_stack: RunningStack) -> float:
    metrics = httpx.get(f"{running_stack.settings.gateway_url}/metrics").text
    return float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("modelprint_gateway_registry_cache_hits ")
        )
    )


def test_auth_missing_wrong_and_disabled_keys(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    client_id, gateway, _ = running_stack.new_client()
    url = f"{running_stack.settings.gateway_url}/v1/models/{small_model.name}/predict"
    body = {"instances": small_model.X[:1].tolist()}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401
    assert "Authorization" in missing.json()["error"]
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer mp_not-a-real-key"})
    assert wrong.status_code == 401
    with gateway:
        hits = _registry_cache_hits(running_stack)
        assert gateway.http.post(url, json=body).status_code == 200
        assert gateway.http.post(url, json=body).status_code == 200
        # The gateway kept the key's client (services/gateway/registry_cache.py) ...
        assert _registry_cache_hits(running_stack) > hits
        with running_stack.operator() as operator:
            operator.set_client_disabled(client_id, disabled=True)
        # ... and the change announced with the disabling emptied it: refused at once.
        disabled = gateway.http.post(url, json=body)
        assert disabled.status_code == 401
        assert "disabled" in disabled.json()["error"]
        with running_stack.operator() as operator:
            operator.set_client_disabled(client_id, disabled=False)
        assert gateway.http.post(url, json=body).status_code == 200


BAD_V1_BODIES = [
    pytest.param(b'{"instances": []}', 422, "empty", id="empty-batch"),
    pytest.param(b'{"instances": [[1, 2, 3]]}', 422, "expects 6", id="wrong-feature-count"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, 6], [1, 2]]}', 422, "row 1 has 2", id="ragged"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, "x"]]}', 422, "not a number", id="string"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, true]]}', 422, "not a number", id="boolean"),
    pytest.param(b'{"instances": [[0.5, false, 3, 4, 5, 6]]}', 422, "not a number", id="false-in-floats"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, {}]]}', 422, "not a number", id="object"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, null]]}', 422, "not a number", id="null"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, NaN]]}', 400, "not valid JSON", id="nan-literal"),
    pytest.param(b'{"instances": [[1, 2, 3, 4, 5, 1e999]]}', 400, "infinity", id="infinity"),
    pytest.param(b'{"instances": "1,2,3"}', 422, "list of rows", id="not-a-list"),
    pytest.param(b'{"rows": [[1, 2, 3, 4, 5, 6]]}', 422, "instances", id="missing-instances"),
    pytest.param(b"not json", 400, "not valid JSON", id="not-json"),
    pytest.param(b"", 400, "empty request body", id="empty-body"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_V1_BODIES)
def test_bad_v1_input_is_refused_and_nothing_is_recorded(
    running_stack: RunningStack, small_model: DeployedTestModel, body: bytes, status: int, fragment: str
) -> None:
    client_id, gateway, _ = running_stack.new_client("bad-input")
    with gateway:
        response = gateway.http.post(
            f"/v1/models/{small_model.name}/predict",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]
        # A good request afterwards is the only thing this client ever gets recorded.
        gateway.predict(small_model.name, small_model.X[:2].tolist())
    wait_until(lambda: running_stack.query_count(client_id) >= 2, 20, "the good request's 2 rows")
    assert running_stack.query_count(client_id) == 2


def test_unknown_model_and_size_limits(running_stack: RunningStack, small_model: DeployedTestModel) -> None:
    client_id, gateway, _ = running_stack.new_client("limits")
    limits = running_stack.settings
    with gateway:
        unknown = gateway.http.post("/v1/models/no-such-model/predict", json={"instances": [[1.0] * 6]})
        assert unknown.status_code == 404
        assert "no-such-model" in unknown.json()["error"]
        too_many_rows = gateway.http.post(
            f"/v1/models/{small_model.name}/predict", json={"instances": [[0.5] * 6] * 1025}
        )
        assert too_many_rows.status_code == 413
        assert "1024" in too_many_rows.json()["error"]
        oversized = gateway.http.post(
            f"/v1/models/{small_model.name}/predict",
            content=b'{"instances": [[' + b"1.0," * (3 * 1024 * 1024) + b"1.0]]}",
            headers={"Content-Type": "application/json"},
        )
        assert oversized.status_code == 413
        assert "limit" in oversized.json()["error"]
    assert limits.gateway_port > 0
    assert running_stack.query_count(client_id) == 0


BAD_V2_BODIES = [
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "INT64", "data": [1] * 6}]}, "FP32 or FP64"
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP64", "data": [1.0] * 5}]}, "expects 6"
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [2, 6], "datatype": "FP64", "data": [1.0] * 6}]}, "needs 12"
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [6], "datatype": "FP64", "data": [1.0] * 6}]}, "shape must be"
    ),
    pytest.param({"inputs": [{"name": "x", "shape": [0, 6], "datatype": "FP64", "data": []}]}, "0 rows"),
    pytest.param({"inputs": []}, "exactly one input"),
    pytest.param({"instances": [[1.0] * 6]}, "'inputs' list"),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP64", "data": [1, 2, 3, 4, 5, "6"]}]},
        "not a number",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 1e300]}]},
        "infinite",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP64", "data": [0.5, 2, 3, 4, 5, True]}]},
        "not a number",
        id="true-in-floats",
    ),
    pytest.param(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 6],
                    "datatype": "FP64",
                    "data": [[1, False, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]],
                }
            ],
            "outputs": [{"name": "predict_proba"}],
        },
        "not a number",
        id="false-in-nested-rows",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP64", "data": [0.5, None, 3, 4, 5, 6]}]},
        "not a number",
        id="null-in-floats",
    ),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_V2_BODIES)
def test_bad_v2_input_is_refused(
    running_stack: RunningStack, small_model: DeployedTestModel, body: dict[str, object], fragment: str
) -> None:
    client_id, gateway, _ = running_stack.new_client("bad-v2")
    with gateway:
        response = gateway.http.post(f"/v2/models/{small_model.name}/infer", json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert running_stack.query_count(client_id) == 0
