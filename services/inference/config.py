"""Inference worker settings: the fingerprint scheme and the worker pool."""

from typing import Literal

from pydantic import Field

from shared.config import Settings


class InferenceSettings(Settings):
    inference_concurrency: int = Field(default=2, ge=1)
    # "solo" runs tasks in the consuming process itself (no hand-off to a pool child, no time limits):
    # run several workers instead of a pool for more cores.
    inference_pool: Literal["prefork", "solo"] = "prefork"
