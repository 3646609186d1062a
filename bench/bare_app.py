"""The baseline without queue, fingerprint or audit: FastAPI + orjson calling `predict_proba` in process.

Serves the Open Inference Protocol's infer route for one skops model file (MODELPRINT_BENCH_MODEL),
answering probabilities and labels like the gateway does. Run by `bench.end_to_end` as:

    MODELPRINT_BENCH_MODEL=model.skops uvicorn --factory bench.bare_app:create_app --port P
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from modelprint.training import load_model_file


def create_app() -> FastAPI:
    """One model, one route, no validation beyond what numpy does."""
    estimator = load_model_file(os.environ["MODELPRINT_BENCH_MODEL"])
    classes = [str(label) for label in estimator.classes_]
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body: Any = orjson.loads(await request.body())
        tensor = body["inputs"][0]
        rows = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
        probabilities = estimator.predict_proba(rows)
        labels = [classes[index] for index in probabilities.argmax(axis=1)]
        return Response(
            orjson.dumps(
                {
                    "model_name": name,
                    "outputs": [
                        {
                            "name": "probabilities",
                            "shape": list(probabilities.shape),
                            "datatype": "FP64",
                            "data": probabilities.ravel().tolist(),
                        },
                        {"name": "label", "shape": [len(labels)], "datatype": "BYTES", "data": labels},
                    ],
                }
            ),
            media_type="application/json",
        )

    return app
