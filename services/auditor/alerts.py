"""Alerts (merged while open), their live stream on Redis, and signed webhook deliveries."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import redis
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db import Alert, Webhook, WebhookDelivery
from shared.netguard import UnsafeUrlError, check_outbound_url

logger = logging.getLogger(__name__)

ALERT_CHANNEL = "modelprint:alerts"
SEVERITIES = ("info", "warning", "critical")
KIND_EXTRACTION_SUSPECTED = "extraction_suspected"
KIND_THEFT_DETECTED = "theft_detected"
SIGNATURE_HEADER = "X-Modelprint-Signature"
TIMESTAMP_HEADER = "X-Modelprint-Timestamp"
MAX_WEBHOOK_RESPONSE_BYTES = 64 * 1024


def alert_payload(alert: Alert) -> dict[str, Any]:
    """The JSON form of an alert, as the API, the stream and webhooks show it."""
    return {
        "id": alert.id,
        "kind": alert.kind,
        "severity": alert.severity,
        "subject": {"type": alert.subject_type, "id": alert.subject_id},
        "message": alert.message,
        "evidence": alert.evidence,
        "occurrences": alert.occurrences,
        "status": "acknowledged" if alert.acknowledged_at else "open",
        "created_at": alert.created_at.isoformat(),
        "updated_at": alert.updated_at.isoformat(),
        "acknowledged_at": alert.acknowledged_at.isoformat() if alert.acknowledged_at else None,
    }


@dataclass(frozen=True)
class RaisedAlert:
    """An alert after raising it, and whether it is new or more severe than before (then notify)."""

    alert: Alert
    notify: bool


def raise_alert(
    session: Session,
    kind: str,
    severity: str,
    subject_type: str,
    subject_id: str,
    message: str,
    evidence: dict[str, Any],
) -> RaisedAlert:
    """Create an alert, or merge into the open one with the same kind and subject."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}")
    previous = session.scalar(
        select(Alert.severity).where(
            Alert.kind == kind,
            Alert.subject_type == subject_type,
            Alert.subject_id == subject_id,
            Alert.acknowledged_at.is_(None),
        )
    )
    statement = insert(Alert).values(
        kind=kind,
        severity=severity,
        subject_type=subject_type,
        subject_id=subject_id,
        message=message,
        evidence=evidence,
        occurrences=1,
    )
    merged_severity = severity if previous is None else max(previous, severity, key=SEVERITIES.index)
    upsert = statement.on_conflict_do_update(
        index_elements=["kind", "subject_type", "subject_id"],
        index_where=Alert.acknowledged_at.is_(None),
        set_={
            "occurrences": Alert.occurrences + 1,
            "updated_at": func.now(),
            "message": message,
            "evidence": evidence,
            "severity": merged_severity,
        },
    ).returning(Alert.id)
    alert_id = session.execute(upsert).scalar_one()
    session.flush()
    alert = session.get(Alert, alert_id, populate_existing=True)
    assert alert is not None
    notify = previous is None or SEVERITIES.index(severity) > SEVERITIES.index(previous)
    return RaisedAlert(alert, notify)


def publish_alert(registry: redis.Redis, alert: Alert, event: str) -> None:
    """Tell live watchers (the SSE stream) about a committed alert."""
    registry.publish(ALERT_CHANNEL, orjson.dumps({"event": event, "alert": alert_payload(alert)}))


def acknowledge(session: Session, alert_id: int) -> Alert | None:
    """Mark an alert acknowledged (a later repeat opens a new alert)."""
    alert = session.get(Alert, alert_id)
    if alert is None:
        return None
    if alert.acknowledged_at is None:
        alert.acknowledged_at = datetime.now(UTC)
        session.flush()
    return alert


def list_alerts(
    session: Session, status: str | None, kind: str | None, since: datetime | None, limit: int
) -> list[Alert]:
    """Alerts, newest first, filtered."""
    statement = select(Alert).order_by(Alert.id.desc()).limit(limit)
    if status == "open":
        statement = statement.where(Alert.acknowledged_at.is_(None))
    elif status == "acknowledged":
        statement = statement.where(Alert.acknowledged_at.is_not(None))
    if kind:
        statement = statement.where(Alert.kind == kind)
    if since:
        statement = statement.where(Alert.updated_at >= since)
    return list(session.scalars(statement))


def alerts_after(session: Session, after_id: int, limit: int = 500) -> list[Alert]:
    """Alerts with ids above a cursor, oldest first (to resume a stream)."""
    return list(session.scalars(select(Alert).where(Alert.id > after_id).order_by(Alert.id).limit(limit)))


# -- webhooks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewWebhook:
    webhook: Webhook
    signing_secret: str


def create_webhook(session: Session, url: str, description: str, allowed_hosts: frozenset[str]) -> NewWebhook:
    """Register a URL for alerts; the signing secret is returned once."""
    check_outbound_url(url, allowed_hosts, "MODELPRINT_WEBHOOK_ALLOWED_HOSTS")
    secret = "whsec_" + secrets.token_urlsafe(32)
    webhook = Webhook(url=url, description=description, signing_secret=secret, active=True)
    session.add(webhook)
    session.flush()
    return NewWebhook(webhook, secret)


def queue_deliveries(session: Session, alert: Alert) -> list[int]:
    """One pending delivery per active webhook for this version of the alert; returns their ids."""
    webhook_ids = list(session.scalars(select(Webhook.id).where(Webhook.active.is_(True))))
    if not webhook_ids:
        return []
    statement = (
        insert(WebhookDelivery)
        .values(
            [
                {"alert_id": alert.id, "webhook_id": webhook_id, "alert_version": alert.occurrences}
                for webhook_id in webhook_ids
            ]
        )
        .on_conflict_do_nothing(constraint="uq_webhook_deliveries_key")
        .returning(WebhookDelivery.id)
    )
    return list(session.scalars(statement))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<body>", hex, as sent in X-Modelprint-Signature (sha256=...)."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def attempt_delivery(
    session: Session, delivery_id: int, allowed_hosts: frozenset[str], max_attempts: int, timeout: float = 5.0
) -> str:
    """POST the alert to the webhook once; returns the new status, or "retry" when it should be retried."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None or delivery.status != "pending":
        return delivery.status if delivery else "missing"
    webhook = session.get(Webhook, delivery.webhook_id)
    alert = session.get(Alert, delivery.alert_id)
    if webhook is None or alert is None or not webhook.active:
        delivery.status = "cancelled"
        return delivery.status
    body = orjson.dumps({"type": "alert", "delivery_id": delivery.id, "alert": alert_payload(alert)})
    timestamp = str(int(time.time()))
    delivery.attempts += 1
    delivery.last_attempt_at = datetime.now(UTC)
    error: str | None = None
    try:
        check_outbound_url(webhook.url, allowed_hosts, "MODELPRINT_WEBHOOK_ALLOWED_HOSTS")
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as http,
            http.stream(
                "POST",
                webhook.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "modelprint-webhooks/1",
                    SIGNATURE_HEADER: sign(webhook.signing_secret, timestamp, body),
                    TIMESTAMP_HEADER: timestamp,
                    "X-Modelprint-Delivery": str(delivery.id),
                },
            ) as response,
        ):
            delivery.last_status_code = response.status_code
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > MAX_WEBHOOK_RESPONSE_BYTES:
                    break
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
    except UnsafeUrlError as exc:
        delivery.status, delivery.last_error = "failed", str(exc)
        return delivery.status
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None:
        delivery.status, delivery.delivered_at, delivery.last_error = "delivered", datetime.now(UTC), None
        return delivery.status
    delivery.last_error = error
    if delivery.attempts >= max_attempts:
        delivery.status = "failed"
        return delivery.status
    return "retry"
