"""Auditor settings: uploads, the registry sync and the audit worker pool."""

from typing import Literal

from pydantic import Field

from shared.config import Settings


class AuditorSettings(Settings):
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    registry_sync_seconds: float = Field(default=30.0, gt=0)
    audit_concurrency: int = Field(default=1, ge=1)
    # As for inference (services/inference/config.py): solo stores in the consuming process itself.
    audit_pool: Literal["prefork", "solo"] = "solo"
    # Processes of the scoring worker (`modelprint worker scoring`), which runs the suspicion detectors,
    # and its CPU priority (nice value): under CPU contention answering and storing queries come first,
    # and scoring catches up (in large, cheaper blocks) when the load eases.
    scoring_concurrency: int = Field(default=1, ge=1)
    scoring_nice: int = Field(default=10, ge=0, le=19)
    # A scoring job first waits while the rest of the machine keeps more than this share of its CPUs
    # busy (1: never), at most until this long after its rows began to wait (shared/priority.py).
    scoring_yield_above: float = Field(default=0.5, ge=0, le=1)
    scoring_yield_max_seconds: float = Field(default=30.0, ge=0, le=600)
    audit_page_limit: int = Field(default=1000, ge=1)
    # The audit outbox (shared/audit_outbox.py). A drain stores up to `audit_drain_messages` messages
    # (jobs) per transaction; a message it claimed but did not commit within the lease (its worker
    # died) is claimed again; the beat checks on this interval for messages no drain has come for.
    audit_drain_messages: int = Field(default=32, ge=1, le=1000)
    # A drain waits this long before its first claim, so that at moderate rates it stores the jobs of
    # that interval in one transaction (and one drain task is queued per interval at most).
    audit_drain_linger_ms: float = Field(default=50.0, ge=0, le=1000)
    audit_outbox_lease_seconds: float = Field(default=30.0, ge=1)
    audit_outbox_check_seconds: float = Field(default=5.0, gt=0)
    # Comma-separated hosts webhooks may reach although they resolve to private/loopback addresses.
    webhook_allowed_hosts: str = ""
    webhook_max_attempts: int = Field(default=8, ge=1)
    # Score a client's new queries after this many new rows, and on a beat schedule.
    suspicion_every: int = Field(default=100, ge=1)
    suspicion_beat_seconds: float = Field(default=30.0, gt=0)
    # A triggered scoring starts this long after its trigger, so that under load one job scores the
    # rows of many requests at once (its cost per row falls several-fold) instead of a few hundred.
    suspicion_delay_seconds: float = Field(default=1.0, ge=0, le=60)
    # Suspect scans: outbound probing limits and the decision level.
    scan_allowed_hosts: str = ""
    scan_max_probes: int = Field(default=5000, ge=10)
    scan_batch_rows: int = Field(default=100, ge=1)
    scan_timeout_seconds: float = Field(default=30.0, gt=0)
    scan_max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    scan_retries: int = Field(default=3, ge=1)
    # Logged queries of the suspected client replayed per scan: a thief's whole history where possible,
    # since every replayed row adds power (a distilled surrogate at 1,500 queries needs all of them).
    scan_replay_rows: int = Field(default=4000, ge=10)
    scan_level: float = Field(default=0.001, gt=0, lt=1)
    scan_dispatch_seconds: float = Field(default=10.0, gt=0)
    scan_worker_concurrency: int = Field(default=1, ge=1)
    # A scan still running after this long is stopped and marked failed (its reason says so).
    scan_time_limit_seconds: int = Field(default=900, ge=30)
