"""Small HTTP clients for the operator API and the gateway, used by the CLI, the demo and the tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm


class ApiCallError(RuntimeError):
    """An API answered with an error; the message is the server's own."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


def _checked(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    raise ApiCallError(response.status_code, message)


class OperatorClient:
    """The auditor's operator API (Bearer admin token)."""

    def __init__(self, base_url: str, admin_token: str, timeout: float = 60.0) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create_client(self, name: str) -> dict[str, Any]:
        return _checked(self.http.post("/v1/clients", json={"name": name}))

    def list_clients(self) -> list[dict[str, Any]]:
        return _checked(self.http.get("/v1/clients"))

    def set_client_disabled(self, client_id: int, disabled: bool) -> dict[str, Any]:
        action = "disable" if disabled else "enable"
        return _checked(self.http.post(f"/v1/clients/{client_id}/{action}"))

    def queries(self, client_id: int, after_id: int = 0, limit: int = 100) -> dict[str, Any]:
        params = {"after_id": after_id, "limit": limit}
        return _checked(self.http.get(f"/v1/clients/{client_id}/queries", params=params))

    def all_queries(self, client_id: int, page_size: int = 1000) -> list[dict[str, Any]]:
        """Every stored query record of a client, following the cursor."""
        records: list[dict[str, Any]] = []
        after_id = 0
        while True:
            page = self.queries(client_id, after_id=after_id, limit=page_size)
            records.extend(page["queries"])
            if page["next_after_id"] is None:
                return records
            after_id = page["next_after_id"]

    def suspicion(self, client_id: int) -> dict[str, Any]:
        return _checked(self.http.get(f"/v1/clients/{client_id}/suspicion"))

    def verify_history(self, client_id: int) -> dict[str, Any]:
        return _checked(self.http.get(f"/v1/clients/{client_id}/history/verify"))

    def list_alerts(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        return _checked(self.http.get("/v1/alerts", params=params))

    def acknowledge_alert(self, alert_id: int) -> dict[str, Any]:
        return _checked(self.http.post(f"/v1/alerts/{alert_id}/ack"))

    def watch_alerts(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, alert) from the server-sent event stream until interrupted."""
        event = "alert"
        with self.http.stream("GET", "/v1/alerts/stream", timeout=httpx.Timeout(10.0, read=None)) as response:
            if not response.is_success:
                response.read()
                _checked(response)
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    yield event, json.loads(line.removeprefix("data: "))

    def create_webhook(self, url: str, description: str = "") -> dict[str, Any]:
        body = {"url": url, "description": description}
        return _checked(self.http.post("/v1/webhooks", json=body))

    def list_webhooks(self) -> list[dict[str, Any]]:
        return _checked(self.http.get("/v1/webhooks"))

    def deactivate_webhook(self, webhook_id: int) -> dict[str, Any]:
        return _checked(self.http.delete(f"/v1/webhooks/{webhook_id}"))

    def create_suspect(self, body: dict[str, Any]) -> dict[str, Any]:
        return _checked(self.http.post("/v1/suspects", json=body))

    def list_suspects(self) -> list[dict[str, Any]]:
        return _checked(self.http.get("/v1/suspects"))

    def scan_suspect(self, suspect_id: int) -> dict[str, Any]:
        return _checked(self.http.post(f"/v1/suspects/{suspect_id}/scans"))

    def get_scan(self, scan_id: int) -> dict[str, Any]:
        return _checked(self.http.get(f"/v1/scans/{scan_id}"))

    def scan_report(self, scan_id: int, report_format: str = "html") -> str:
        response = self.http.get(f"/v1/scans/{scan_id}/report", params={"format": report_format})
        if not response.is_success:
            _checked(response)
        return response.text

    def deploy_model(self, name: str, model_file: Path, reference_data: Path | None = None) -> dict[str, Any]:
        files: dict[str, tuple[str, bytes, str]] = {
            "file": (model_file.name, model_file.read_bytes(), "application/octet-stream")
        }
        if reference_data is not None:
            files["reference_data"] = (
                reference_data.name,
                reference_data.read_bytes(),
                "application/octet-stream",
            )
        return _checked(self.http.post("/v1/models", data={"name": name}, files=files))

    def list_models(self) -> list[dict[str, Any]]:
        return _checked(self.http.get("/v1/models"))


class GatewayClient:
    """The public prediction API (Bearer client API key)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def predict(self, model: str, instances: list[list[float]]) -> dict[str, Any]:
        return _checked(self.http.post(f"/v1/models/{model}/predict", json={"instances": instances}))

    def predict_rows(
        self, model: str, rows: np.ndarray, batch_size: int = 100, desc: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Send rows in batches; returns (labels, probabilities) in order. A progress bar when desc is set."""
        labels: list[str] = []
        probabilities: list[list[float]] = []
        starts = range(0, rows.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, unit="req", leave=False, disable=desc is None):
            answer = self.predict(model, np.asarray(rows[start : start + batch_size], np.float64).tolist())
            labels.extend(str(p["label"]) for p in answer["predictions"])
            probabilities.extend(p["probabilities"] for p in answer["predictions"])
        return np.array(labels), np.array(probabilities, dtype=np.float64).reshape(len(labels), -1)

    def infer_v2(self, model: str, rows: list[list[float]], datatype: str = "FP64") -> dict[str, Any]:
        body = {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": [len(rows), len(rows[0])],
                    "datatype": datatype,
                    "data": [value for row in rows for value in row],
                }
            ]
        }
        return _checked(self.http.post(f"/v2/models/{model}/infer", json=body))
