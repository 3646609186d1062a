"""Scan duration: how long a suspect scan takes when the suspected client sent 2,000 queries.

Starts the stack as `modelprint up` does, deploys the paper's ECG MLP, lets a thief send 2,000
natural ECG queries through the gateway (in requests of 100 rows), trains the thief's surrogate on
the returned labels, serves it over the Open Inference Protocol on 127.0.0.1, registers it as a
suspect of that client and scans it several times. Prints, per scan, the time from the request to
the finished verdict (queued + probing + tests), the worker's own time (started -> finished), the
rows probed and the verdict. Usage:

    .venv/bin/python -m bench.scan_duration [--queries 2000] [--scans 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.end_to_end import MODEL_NAME, modelprint_server, request_bodies
from modelprint.attacks import ecg_sampler, natural_queries
from modelprint.client import GatewayClient, OperatorClient
from modelprint.stack import StackOptions
from modelprint.training import save_model, save_reference_data, train_ecg_model
from modelprint.v2server import V2Server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=2000, help="queries the suspected client sent")
    parser.add_argument("--scans", type=int, default=3)
    args = parser.parse_args()
    trained = train_ecg_model()
    probe = request_bodies(np.vstack([trained.X_train, trained.X_test]), 1, np.random.default_rng(0))[0]
    env = {"MODELPRINT_SCAN_ALLOWED_HOSTS": "127.0.0.1", "MODELPRINT_SCAN_DISPATCH_SECONDS": "1"}
    rows: list[tuple[float, float, Any, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelprint-scan-") as tmp:
        folder = Path(tmp)
        save_model(trained.estimator, folder / "ecg.skops")
        save_reference_data(trained.X_test, trained.y_test, folder / "reference.npz")
        options = StackOptions(with_beat=True)
        with modelprint_server(
            "modelprint", folder, folder / "ecg.skops", folder / "reference.npz", options, probe, env
        ) as server:
            with OperatorClient(server.operator_url, server.admin_token) as operator:
                thief = operator.create_client("thief")
                queries = natural_queries(ecg_sampler(np.random.default_rng(4242)), args.queries)
                labels: list[Any] = []
                with GatewayClient(f"http://{server.host}:{server.port}", thief["api_key"]) as gateway:
                    for start in range(0, args.queries, 100):
                        answer = gateway.predict(MODEL_NAME, queries[start : start + 100].tolist())
                        labels += [prediction["label"] for prediction in answer["predictions"]]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=ConvergenceWarning)
                    surrogate = make_pipeline(
                        StandardScaler(), MLPClassifier((64, 32), max_iter=300, random_state=1)
                    ).fit(queries, labels)
                suspect_server = V2Server(
                    "surrogate", surrogate.predict_proba, [str(c) for c in surrogate.classes_]
                ).start()
                try:
                    deadline = time.monotonic() + 60
                    while operator.verify_history(thief["id"])["stored_length"] < args.queries:
                        if time.monotonic() > deadline:
                            raise TimeoutError("the thief's queries did not reach the audit history")
                        time.sleep(0.5)
                    suspect = operator.create_suspect(
                        {
                            "name": "surrogate",
                            "url": suspect_server.url,
                            "protocol": "v2",
                            "model": MODEL_NAME,
                            "remote_model": "surrogate",
                            "suspected_client_id": thief["id"],
                        }
                    )
                    for index in range(args.scans):
                        print(f"scan {index + 1}/{args.scans} ...", flush=True)
                        requested = time.monotonic()
                        scan = operator.scan_suspect(suspect["id"])
                        while (scan := operator.get_scan(scan["id"]))["status"] not in ("done", "failed"):
                            if time.monotonic() - requested > 900:
                                raise TimeoutError("the scan did not finish in 15 minutes")
                            time.sleep(0.1)
                        total = time.monotonic() - requested
                        worked = (
                            datetime.fromisoformat(scan["finished_at"])
                            - datetime.fromisoformat(scan["started_at"])
                        ).total_seconds()
                        rows.append((total, worked, scan["probes"], scan["verdict"] or scan["error"]))
                finally:
                    suspect_server.stop()
    print(f"\nscan of a suspect whose suspected client sent {args.queries} queries (ECG MLP, 80 features)")
    print(f"{'scan':>5} {'requested->done s':>18} {'started->done s':>16} {'rows probed':>12}  verdict")
    for index, (total, worked, probes, verdict) in enumerate(rows, start=1):
        print(f"{index:>5} {total:>18.2f} {worked:>16.2f} {probes!s:>12}  {verdict}")
    print(
        f"median {statistics.median(r[0] for r in rows):>17.2f} "
        f"{statistics.median(r[1] for r in rows):>16.2f}"
    )


if __name__ == "__main__":
    main()
