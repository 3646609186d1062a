"""Auditor settings: uploads, the registry sync and the audit worker pool."""

from pydantic import Field

from shared.config import Settings


class AuditorSettings(Settings):
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    registry_sync_seconds: float = Field(default=30.0, gt=0)
    audit_concurrency: int = Field(default=1, ge=1)
    audit_page_limit: int = Field(default=1000, ge=1)
    # Comma-separated hosts webhooks may reach although they resolve to private/loopback addresses.
    webhook_allowed_hosts: str = ""
    webhook_max_attempts: int = Field(default=8, ge=1)
    # Score a client's new queries after this many new rows, and on a beat schedule.
    suspicion_every: int = Field(default=100, ge=1)
    suspicion_beat_seconds: float = Field(default=30.0, gt=0)
