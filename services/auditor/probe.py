"""Probing a suspect endpoint safely: SSRF guard, no redirects, timeouts, retries, size and count caps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson

from services.auditor.scanstats import SuspectAnswers
from shared.netguard import check_outbound_url

logger = logging.getLogger(__name__)


class ProbeError(RuntimeError):
    """The suspect could not be probed; the message says why (shown as the scan's error)."""


@dataclass(frozen=True)
class ProbeTarget:
    """Where and how to reach a suspect."""

    url: str
    protocol: str  # "v2" (Open Inference Protocol) or "modelprint" (/v1)
    remote_model: str
    headers: dict[str, str]


@dataclass(frozen=True)
class ProbeLimits:
    allowed_hosts: frozenset[str]
    max_probes: int
    batch_rows: int
    timeout_seconds: float
    max_response_bytes: int
    retries: int


def _endpoint(target: ProbeTarget) -> str:
    base = target.url.rstrip("/")
    if target.protocol == "v2":
        return f"{base}/v2/models/{target.remote_model}/infer"
    return f"{base}/v1/models/{target.remote_model}/predict"


def _body(target: ProbeTarget, rows: np.ndarray) -> bytes:
    if target.protocol == "v2":
        tensor = {
            "name": "input-0",
            "shape": list(rows.shape),
            "datatype": "FP64",
            "data": rows.ravel().tolist(),
        }
        return orjson.dumps({"inputs": [tensor]})
    return orjson.dumps({"instances": rows.tolist()})


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise ProbeError(
                f"the suspect's response exceeds {limit} bytes (MODELPRINT_SCAN_MAX_RESPONSE_BYTES)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _label_indices(labels: list[Any], classes: list[Any]) -> np.ndarray:
    lookup = {str(label): index for index, label in enumerate(classes)}
    return np.array([lookup.get(str(label), -1) for label in labels], dtype=np.int64)


def parse_answer(target: ProbeTarget, payload: Any, rows: int, classes: list[Any]) -> SuspectAnswers:
    """The suspect's labels (as our class indices) and probabilities (in our class order, if given)."""
    if not isinstance(payload, dict):
        raise ProbeError("the suspect's answer is not a JSON object")
    probabilities: np.ndarray | None = None
    labels: np.ndarray | None = None
    if target.protocol == "v2":
        outputs = payload.get("outputs")
        if not isinstance(outputs, list):
            raise ProbeError("the suspect's v2 answer has no 'outputs' list")
        for output in outputs:
            if not isinstance(output, dict):
                continue
            data, shape = output.get("data"), output.get("shape")
            if output.get("datatype") == "BYTES" and isinstance(data, list) and len(data) == rows:
                labels = _label_indices(data, classes)
            elif output.get("datatype") in ("FP32", "FP64") and shape == [rows, len(classes)]:
                # The Open Inference Protocol carries no class names: assume scikit-learn's sorted order,
                # which is also ours (a copy of our model keeps it).
                probabilities = np.asarray(data, dtype=np.float64).reshape(rows, len(classes))
    else:
        predictions = payload.get("predictions")
        suspect_classes = payload.get("classes")
        if not isinstance(predictions, list) or len(predictions) != rows:
            raise ProbeError("the suspect's answer has no 'predictions' for every row")
        labels = _label_indices([p.get("label") for p in predictions], classes)
        if isinstance(suspect_classes, list) and sorted(map(str, suspect_classes)) == sorted(
            map(str, classes)
        ):
            order = [[str(c) for c in suspect_classes].index(str(c)) for c in classes]
            raw = np.asarray([p.get("probabilities") for p in predictions], dtype=np.float64)
            if raw.shape == (rows, len(classes)):
                probabilities = raw[:, order]
    if probabilities is not None and not np.all(np.isfinite(probabilities)):
        probabilities = None
    if labels is None:
        if probabilities is None:
            raise ProbeError("the suspect's answer has neither labels nor class probabilities we can read")
        labels = probabilities.argmax(axis=1)
    return SuspectAnswers(labels=labels, probabilities=probabilities)


def probe(target: ProbeTarget, inputs: np.ndarray, classes: list[Any], limits: ProbeLimits) -> SuspectAnswers:
    """Send every row to the suspect in batches; raise ProbeError with a readable reason on failure."""
    if inputs.shape[0] > limits.max_probes:
        raise ProbeError(f"{inputs.shape[0]} probes exceed MODELPRINT_SCAN_MAX_PROBES={limits.max_probes}")
    check_outbound_url(target.url, limits.allowed_hosts, "MODELPRINT_SCAN_ALLOWED_HOSTS")
    endpoint = _endpoint(target)
    headers = {"Content-Type": "application/json", "User-Agent": "modelprint-scan/1", **target.headers}
    timeout = httpx.Timeout(limits.timeout_seconds, connect=min(5.0, limits.timeout_seconds))
    answers: list[SuspectAnswers] = []
    with httpx.Client(timeout=timeout, follow_redirects=False) as http:
        for start in range(0, inputs.shape[0], limits.batch_rows):
            rows = inputs[start : start + limits.batch_rows]
            payload = _post_with_retries(http, endpoint, _body(target, rows), headers, limits)
            answers.append(parse_answer(target, payload, rows.shape[0], classes))
    probabilities = (
        np.vstack([a.probabilities for a in answers if a.probabilities is not None])
        if all(a.probabilities is not None for a in answers)
        else None
    )
    return SuspectAnswers(labels=np.concatenate([a.labels for a in answers]), probabilities=probabilities)


def _post_with_retries(
    http: httpx.Client, endpoint: str, body: bytes, headers: dict[str, str], limits: ProbeLimits
) -> Any:
    last_error = "no attempt made"
    for attempt in range(limits.retries):
        if attempt:
            time.sleep(min(8.0, 0.5 * 2**attempt))
        try:
            with http.stream("POST", endpoint, content=body, headers=headers) as response:
                if 300 <= response.status_code < 400:
                    raise ProbeError(
                        f"the suspect redirected (HTTP {response.status_code}); redirects are refused"
                    )
                content = _read_limited(response, limits.max_response_bytes)
                if response.status_code >= 500 or response.status_code == 429:
                    last_error = f"HTTP {response.status_code} from the suspect"
                    continue
                if response.status_code >= 400:
                    raise ProbeError(
                        f"the suspect refused the probe: HTTP {response.status_code} {content[:200]!r}"
                    )
                try:
                    return orjson.loads(content)
                except orjson.JSONDecodeError as exc:
                    raise ProbeError(f"the suspect's answer is not JSON ({exc})") from exc
        except httpx.TransportError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
    raise ProbeError(f"the suspect did not answer after {limits.retries} attempts: {last_error}")
