"""Operator API request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, Field

from shared.schemas import ClassLabel


class ClientCreate(BaseModel):
    name: str = Field(
        min_length=1, max_length=200, description="A label for the client, e.g. a customer name"
    )


class ClientOut(BaseModel):
    id: int
    name: str
    api_key_prefix: str
    created_at: datetime
    disabled: bool
    disabled_at: datetime | None
    suspicion: str = Field(default="none", description="none, suspected or high (see /suspicion)")


class ClientCreated(ClientOut):
    api_key: str = Field(description="Shown only in this response; store it now")


class ModelVersionOut(BaseModel):
    name: str
    version: int
    sha256: str
    n_features: int
    classes: list[ClassLabel]
    estimator_type: str
    reference_rows: int | None
    created_at: datetime


class ModelOut(BaseModel):
    name: str
    active_version: int | None
    versions: list[ModelVersionOut]


class QueryRecordOut(BaseModel):
    id: int = Field(description="The paging cursor: equal to seq")
    seq: int = Field(description="The row's position in the client's history and hash chain (from 1)")
    request_id: str
    row_index: int
    model: str
    model_version: int
    scheme: str
    key_id: str
    answered_at: datetime
    input: list[float]
    probabilities: list[float]
    label: str


class QueryPage(BaseModel):
    client_id: int
    queries: list[QueryRecordOut]
    next_after_id: int | None = Field(description="Pass as after_id to get the next page; null at the end")


class ChainVerificationOut(BaseModel):
    client_id: int
    ok: bool = Field(description="True when every record links to the one before and none was altered")
    records_checked: int
    stored_length: int
    head_hash: str = Field(description="The recomputed head of the chain (up to the first broken link)")
    stored_head_hash: str
    first_broken_seq: int | None
    first_broken_request_id: str | None = Field(description="The request holding the first broken record")
    reason: str | None


class WebhookCreate(BaseModel):
    url: AnyHttpUrl = Field(description="Receives each alert as a signed JSON POST")
    description: str = Field(default="", max_length=200)


class WebhookOut(BaseModel):
    id: int
    url: str
    description: str
    active: bool
    created_at: datetime


class WebhookCreated(WebhookOut):
    signing_secret: str = Field(description="Verify X-Modelprint-Signature with it; shown only here")


class DeliveryOut(BaseModel):
    id: int
    alert_id: int
    webhook_id: int
    alert_version: int
    status: str
    attempts: int
    last_error: str | None
    last_status_code: int | None
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None


HEADER_NAME_PATTERN = r"^[A-Za-z0-9-]{1,100}$"


class SuspectCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    url: AnyHttpUrl = Field(description="Base URL of the suspect service, e.g. https://api.example.com")
    protocol: Literal["v2", "modelprint"] = Field(description="v2: Open Inference Protocol; modelprint: /v1")
    model: str = Field(description="Our model the suspect is thought to copy")
    remote_model: str | None = Field(default=None, max_length=200, description="The suspect's model name")
    suspected_client_id: int | None = None
    interval_seconds: int | None = Field(default=None, ge=5, description="Scan on this schedule")
    headers: dict[str, str] = Field(default_factory=dict, description="Sent to the suspect, e.g. its API key")


class SuspectUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    url: AnyHttpUrl | None = None
    remote_model: str | None = Field(default=None, max_length=200)
    suspected_client_id: int | None = None
    interval_seconds: int | None = Field(default=None, ge=5)
    headers: dict[str, str] | None = None
    paused: bool | None = None


class SuspectOut(BaseModel):
    id: int
    name: str
    url: str
    protocol: str
    model: str
    remote_model: str
    suspected_client_id: int | None
    interval_seconds: int | None
    paused: bool
    header_names: list[str] = Field(description="Header values are stored but never shown")
    created_at: datetime
    next_scan_at: datetime | None


class ScanOut(BaseModel):
    id: int
    suspect_id: int
    trigger: str
    status: str
    verdict: str | None
    p_value: float | None
    probes: int | None
    tests: list[dict[str, Any]]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
