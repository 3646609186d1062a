"""Gateway settings: request limits enforced before anything is enqueued."""

from pydantic import Field

from shared.config import Settings


class GatewaySettings(Settings):
    max_batch_rows: int = Field(default=1024, ge=1)
    max_features: int = Field(default=4096, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    predict_timeout_seconds: float = Field(default=10.0, gt=0)
    max_inference_backlog: int = Field(default=5000, ge=1)
    # How long the gateway may keep a key's client and a model's version it read from Redis; emptied at
    # once on every registry change (services/gateway/registry_cache.py). 0: read Redis on every request.
    registry_cache_seconds: float = Field(default=5.0, ge=0, le=60)
    # Requests arriving within this window of each other go to the inference queue as one job.
    micro_batch_window_ms: float = Field(default=2.0, ge=0, le=100)
    micro_batch_max_rows: int = Field(default=1024, ge=1)
    # A request that finds fewer than this many of the gateway's jobs awaiting replies is sent at once,
    # without waiting for the window. 0 (default): every job waits for its window. 1 lowers latency
    # under light load but makes more, smaller jobs under a closed-loop load (README, Benchmarks).
    micro_batch_eager_jobs: int = Field(default=0, ge=0)
    # A request is sent at once, without the window, while none of the gateway's jobs awaits a reply
    # and its last job carried a single request: nothing is coalescing, the window would only delay it.
    micro_batch_send_lone: bool = True
    # Admission control: when the audit workers report a lag (answer to commit) above this, the gateway
    # paces its intake (rows per second) until they catch up; 0 turns it off.
    audit_lag_target_seconds: float = Field(default=2.0, ge=0)
