"""Inference worker settings: the fingerprint scheme and the worker pool."""

from pydantic import Field

from shared.config import Settings


class InferenceSettings(Settings):
    fingerprint_scheme: str = "hmac-second-class"
    fingerprint_alpha: float = Field(default=0.08, gt=0.0, le=1.0)
    inference_concurrency: int = Field(default=2, ge=1)
