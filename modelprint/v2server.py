"""A minimal Open Inference Protocol (KServe v2) server for a scikit-learn model, on 127.0.0.1.

Used by the demo and the tests to stand in for a third party's endpoint (a thief's surrogate, an
independent company's model). It is deliberately small: one model, JSON, FP32/FP64 inputs.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class V2Server:
    """Serves `predict_proba` of one model at http://127.0.0.1:<port>/v2/models/<name>/infer."""

    name: str
    predict_proba: Callable[[np.ndarray], np.ndarray]
    classes: list[Any]
    labels_only: bool = False
    port: int = 0
    _server: http.server.ThreadingHTTPServer | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> V2Server:
        """Serve in a background thread; returns self."""
        handler = _make_handler(self)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name=f"v2-{self.name}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The v2 response to an inference request (raises ValueError on a malformed one)."""
        tensor = body["inputs"][0]
        if tensor["datatype"] not in ("FP32", "FP64"):
            raise ValueError("datatype must be FP32 or FP64")
        rows, features = tensor["shape"]
        inputs = np.asarray(tensor["data"], dtype=np.float64).reshape(rows, features)
        probabilities = np.asarray(self.predict_proba(inputs), dtype=np.float64)
        labels = [str(self.classes[index]) for index in probabilities.argmax(axis=1)]
        label_output = {"name": "label", "shape": [rows], "datatype": "BYTES", "data": labels}
        outputs: list[dict[str, Any]] = [label_output]
        if not self.labels_only:
            outputs.insert(
                0,
                {
                    "name": "probabilities",
                    "shape": list(probabilities.shape),
                    "datatype": "FP64",
                    "data": probabilities.ravel().tolist(),
                },
            )
        return {"model_name": self.name, "outputs": outputs}


def _make_handler(server: V2Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path in ("/v2/health/ready", "/v2/health/live"):
                self._send(200, {"ready": True})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != f"/v2/models/{server.name}/infer":
                self._send(404, {"error": f"unknown model path {self.path}"})
                return
            length = int(self.headers.get("Content-Length", "0"))
            if length > MAX_BODY_BYTES:
                self._send(413, {"error": "body too large"})
                return
            try:
                payload = server.answer(json.loads(self.rfile.read(length)))
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                self._send(400, {"error": f"bad request: {exc}"})
                return
            self._send(200, payload)

        def log_message(self, *_: Any) -> None:
            return

    return Handler
