"""Inference worker settings: the fingerprint scheme and the worker pool."""

from typing import Literal

from pydantic import Field

from shared.config import Settings


class InferenceSettings(Settings):
    # "solo" (default) runs tasks in the consuming process itself, with no hand-off to a pool child:
    # less CPU and latency per job; run one worker per core (shared/solo_limits.py gives its tasks
    # their time limits). "prefork" runs `inference_concurrency` pool children under one consumer.
    inference_pool: Literal["prefork", "solo"] = "solo"
    inference_concurrency: int = Field(default=2, ge=1)
    # Serve supported models (scaler + MLP) with a compiled predict_proba that equals scikit-learn's
    # bit for bit on probe rows (services/inference/fastpath.py); False: always scikit-learn's.
    compile_models: bool = True
