"""Inference worker settings: the fingerprint scheme and the worker pool."""

from pydantic import Field

from shared.config import Settings


class InferenceSettings(Settings):
    inference_concurrency: int = Field(default=2, ge=1)
