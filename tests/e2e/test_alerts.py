"""Alerts end to end: merging, acknowledging, the SSE stream, signed webhooks with retries, SSRF guard."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningStack, wait_until

pytestmark = pytest.mark.e2e


class _Receiver(http.server.BaseHTTPRequestHandler):
    """Records webhook POSTs; answers 500 to the first `failures` of them."""

    received: list[tuple[dict[str, str], bytes]]
    failures: int

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append((dict(self.headers.items()), body))
        status = 500 if len(type(self).received) <= type(self).failures else 204
        self.send_response(status)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"received": [], "failures": 1})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


def _raise(subject: str, severity: str = "warning") -> int:
    from services.auditor import tasks

    return tasks.raise_and_notify(
        "extraction_suspected", severity, "client", subject, f"test alert for {subject}", {"score": 0.9}
    )


def test_repeats_merge_and_ack_reopens(running_stack: RunningStack) -> None:
    subject = f"merge-{uuid.uuid4().hex[:6]}"
    first = _raise(subject)
    second = _raise(subject, "critical")
    assert first == second
    with running_stack.operator() as operator:
        listed = operator.http.get(
            "/v1/alerts", params={"status": "open", "kind": "extraction_suspected"}
        ).json()
        mine = next(alert for alert in listed if alert["id"] == first)
        assert mine["occurrences"] == 2
        assert mine["severity"] == "critical"
        acked = operator.http.post(f"/v1/alerts/{first}/ack").json()
        assert acked["status"] == "acknowledged"
        assert operator.http.post("/v1/alerts/999999999/ack").status_code == 404
    # After an acknowledgement, the same condition opens a new alert.
    assert _raise(subject) != first


def test_sse_stream_delivers_new_alerts(running_stack: RunningStack) -> None:
    subject = f"stream-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {running_stack.secrets.admin_token}"}
    received: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", f"{running_stack.settings.auditor_url}/v1/alerts/stream", headers=headers, timeout=20
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == ": connected"
        alert_id = _raise(subject)
        event = None
        for line in lines:
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            if line.startswith("data: "):
                payload = orjson.loads(line.removeprefix("data: "))
                received.append(payload)
                if payload["subject"]["id"] == subject:
                    break
    assert event == "alert"
    assert received[-1]["id"] == alert_id
    # Resuming from an id replays what came after it.
    with httpx.stream(
        "GET",
        f"{running_stack.settings.auditor_url}/v1/alerts/stream",
        headers={**headers, "Last-Event-ID": str(alert_id - 1)},
        timeout=20,
    ) as response:
        first_data = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert orjson.loads(first_data.removeprefix("data: "))["id"] == alert_id


def test_webhook_is_signed_retried_and_tracked(
    running_stack: RunningStack, receiver: tuple[str, type[_Receiver]]
) -> None:
    url, handler = receiver
    with running_stack.operator() as operator:
        created = operator.http.post("/v1/webhooks", json={"url": url, "description": "test"}).json()
        assert created["signing_secret"].startswith("whsec_")
        assert "signing_secret" not in operator.http.get("/v1/webhooks").json()[-1]
        subject = f"hook-{uuid.uuid4().hex[:6]}"
        alert_id = _raise(subject)
        wait_until(lambda: len(handler.received) >= 2, 30, "a failed and a retried webhook delivery", 0.2)
        deliveries = wait_until(
            lambda: [
                d
                for d in operator.http.get(f"/v1/webhooks/{created['id']}/deliveries").json()
                if d["alert_id"] == alert_id and d["status"] == "delivered"
            ],
            30,
            "the delivery to be marked delivered",
        )
        operator.http.delete(f"/v1/webhooks/{created['id']}")
    assert deliveries[0]["attempts"] == 2
    headers, body = handler.received[-1]
    payload = orjson.loads(body)
    assert payload["alert"]["id"] == alert_id
    expected = hmac.new(
        created["signing_secret"].encode(),
        headers["X-Modelprint-Timestamp"].encode() + b"." + body,
        hashlib.sha256,
    ).hexdigest()
    assert headers["X-Modelprint-Signature"] == f"sha256={expected}"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://[::1]:8080/hook",
        "ftp://example.org/hook",
        "http://user:pass@127.0.0.1/hook",
    ],
)
def test_webhook_urls_to_internal_addresses_are_refused(running_stack: RunningStack, url: str) -> None:
    with running_stack.operator() as operator:
        response = operator.http.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422
    assert response.json()["error"]
