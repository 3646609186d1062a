"""End to end: the operator API (auth, clients, models, query pages) and the stack's own guarantees."""

from __future__ import annotations

import io
import json
import re
import stat
from pathlib import Path

import httpx
import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression

from modelprint.client import ApiCallError
from modelprint.stack import AlreadyRunningError, Stack
from shared.config import Settings
from tests.conftest import DeployedTestModel, RunningStack, wait_until

pytestmark = pytest.mark.e2e


def test_operator_api_requires_the_admin_token(running_stack: RunningStack) -> None:
    base = running_stack.settings.auditor_url
    assert httpx.get(f"{base}/v1/clients").status_code == 401
    wrong = httpx.get(f"{base}/v1/clients", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "invalid admin token"}
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}


def test_client_key_is_shown_once_and_stored_hashed(running_stack: RunningStack) -> None:
    with running_stack.operator() as operator:
        created = operator.create_client("hospital-a")
        listed = operator.list_clients()
        again = operator.http.get(f"/v1/clients/{created['id']}").json()
    assert created["api_key"].startswith("mp_")
    assert len(created["api_key"]) > 40
    mine = next(client for client in listed if client["id"] == created["id"])
    assert "api_key" not in mine
    assert "api_key" not in again
    assert created["api_key"].startswith(mine["api_key_prefix"])
    # The database holds only the SHA-256 of the key.
    from sqlalchemy import text

    from shared.db import session_scope
    from shared.security import hash_api_key

    with session_scope(running_stack.stack.database_url or "") as session:
        stored = session.execute(
            text("SELECT api_key_hash FROM clients WHERE id = :id"), {"id": created["id"]}
        ).scalar_one()
    assert stored == hash_api_key(created["api_key"])
    assert created["api_key"] not in stored


def test_unknown_client_is_404(running_stack: RunningStack) -> None:
    with running_stack.operator() as operator:
        response = operator.http.post("/v1/clients/999999/disable")
        assert response.status_code == 404
        assert "999999" in response.json()["error"]
        assert operator.http.get("/v1/clients/999999/queries").status_code == 404
        assert operator.http.post("/v1/clients", json={"name": ""}).status_code == 422


def test_model_upload_versions_and_validation(running_stack: RunningStack, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(120, 4))
    labels = (features[:, 0] > 0).astype(int)
    model_path = tmp_path / "lr.skops"
    sio.dump(LogisticRegression().fit(features, labels), model_path)
    with running_stack.operator() as operator:
        first = operator.deploy_model("upload-lr", model_path)
        second = operator.deploy_model("upload-lr", model_path)
        listed = {model["name"]: model for model in operator.list_models()}
        assert (first["version"], second["version"]) == (1, 2)
        assert first["sha256"] == second["sha256"]
        assert listed["upload-lr"]["active_version"] == 2
        assert first["classes"] == [0, 1]
        assert first["n_features"] == 4

        def upload(name: str, content: bytes, reference: bytes | None = None) -> httpx.Response:
            files = {"file": ("m.skops", content, "application/octet-stream")}
            if reference is not None:
                files["reference_data"] = ("r.npz", reference, "application/octet-stream")
            return operator.http.post("/v1/models", data={"name": name}, files=files)

        garbage = upload("garbage", b"this is not a skops file")
        assert garbage.status_code == 422
        assert "skops" in garbage.json()["error"]
        bad_name = upload("../etc", model_path.read_bytes())
        assert bad_name.status_code == 422
        wrong_reference = io.BytesIO()
        np.savez(wrong_reference, X=np.zeros((5, 3)), y=np.zeros(5))
        mismatch = upload("ref-mismatch", model_path.read_bytes(), wrong_reference.getvalue())
        assert mismatch.status_code == 422
        assert "expected (rows, 4)" in mismatch.json()["error"]
        missing = operator.http.get("/v1/models/never-deployed")
        assert missing.status_code == 404
        assert "no model named" in missing.json()["error"]
        with pytest.raises(ApiCallError, match="HTTP 422"):
            operator.deploy_model("bad/name", model_path)


def test_untrusted_types_in_a_model_file_are_refused(running_stack: RunningStack, tmp_path: Path) -> None:
    from sklearn.preprocessing import FunctionTransformer

    # A FunctionTransformer wrapping an arbitrary callable is exactly what an attacker would ship.
    malicious = FunctionTransformer(func=json.loads)
    malicious.fit(np.zeros((2, 2)))
    path = tmp_path / "malicious.skops"
    sio.dump(malicious, path)
    with running_stack.operator() as operator:
        response = operator.http.post(
            "/v1/models",
            data={"name": "malicious"},
            files={"file": ("m.skops", path.read_bytes(), "application/octet-stream")},
        )
    assert response.status_code == 422
    assert "not trusted" in response.json()["error"]


def test_query_history_pages(running_stack: RunningStack, small_model: DeployedTestModel) -> None:
    client_id, gateway, _ = running_stack.new_client("pages")
    with gateway:
        gateway.predict(small_model.name, small_model.X[:25].tolist())
    wait_until(lambda: running_stack.query_count(client_id) >= 25, 20, "25 rows stored")
    with running_stack.operator() as operator:
        first = operator.queries(client_id, limit=10)
        second = operator.queries(client_id, after_id=first["next_after_id"], limit=10)
        third = operator.queries(client_id, after_id=second["next_after_id"], limit=10)
        too_big = operator.http.get(f"/v1/clients/{client_id}/queries", params={"limit": 100000})
    assert [len(page["queries"]) for page in (first, second, third)] == [10, 10, 5]
    assert third["next_after_id"] is None
    assert [q["row_index"] for q in first["queries"] + second["queries"] + third["queries"]] == list(
        range(25)
    )
    assert too_big.status_code == 422


def test_second_stack_on_the_same_data_dir_is_refused(running_stack: RunningStack) -> None:
    second = Stack(Settings(data_dir=running_stack.data_dir))
    with pytest.raises(AlreadyRunningError, match="already running on data dir"):
        second.start()


def test_secrets_file_is_private(running_stack: RunningStack) -> None:
    mode = stat.S_IMODE(running_stack.settings.secrets_path.stat().st_mode)
    assert mode == 0o600


def test_secrets_never_appear_in_logs_or_responses(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    _, gateway, api_key = running_stack.new_client("leak-check")
    with gateway:
        answer = gateway.http.post(
            f"/v1/models/{small_model.name}/predict", json={"instances": small_model.X[:3].tolist()}
        ).text
        bad = gateway.http.post(f"/v1/models/{small_model.name}/predict", json={"instances": [[1]]}).text
    secrets = [
        running_stack.secrets.admin_token,
        api_key,
        *(key.decode() for key in running_stack.secrets.fingerprint_keys.values()),
    ]
    logs = "\n".join(
        path.read_text(errors="replace") for path in (running_stack.data_dir / "logs").glob("*.log")
    )
    assert logs, "the services wrote no logs at all"
    for secret in secrets:
        assert secret not in logs
        assert secret not in answer
        assert secret not in bad
    assert not re.search(r"mp_[A-Za-z0-9_-]{30,}", logs)


def test_workers_log_no_line_per_task_by_default(
    running_stack: RunningStack, small_model: DeployedTestModel
) -> None:
    """Celery's "received"/"succeeded" INFO lines (two per job, 100 KB/s per worker at 200 jobs/s)
    are left out unless MODELPRINT_LOG_EACH_TASK; the workers still log at INFO otherwise."""
    client_id, gateway, _ = running_stack.new_client("log-volume")
    with gateway:
        for _ in range(3):
            gateway.predict(small_model.name, small_model.X[:1].tolist())
    wait_until(lambda: running_stack.query_count(client_id) == 3, 20, "the 3 rows stored")
    logs = {
        path.name: path.read_text(errors="replace")
        for path in (running_stack.data_dir / "logs").glob("*worker*.log")
    }
    assert any('"level": "info"' in text for text in logs.values()), "the workers logged nothing at INFO"
    for name, text in logs.items():
        assert "] received" not in text, name
        assert "] succeeded in" not in text, name
