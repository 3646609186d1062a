"""Celery tasks of the auditor (audit, scoring and scans queues) and its beat schedule: thin wrappers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import redis
from celery.signals import worker_init, worker_process_init
from pydantic import ValidationError
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError

from services.auditor import alerts, scans, service, suspicion
from services.auditor.config import AuditorSettings
from services.auditor.probe import ProbeLimits
from shared import audit_outbox
from shared.celery_app import create_celery_app
from shared.config import load_secrets
from shared.db import Client, Suspect, session_factory, session_scope
from shared.fingerprint import get_scheme
from shared.gc_tuning import tune_garbage_collector
from shared.logs import configure_logging
from shared.names import (
    QUEUE_AUDIT,
    QUEUE_SCANS,
    QUEUE_SCORING,
    REDIS_AUDIT_LAG,
    REDIS_SCORING_PENDING_PREFIX,
    TASK_DELIVER_WEBHOOK,
    TASK_DISPATCH_SCANS,
    TASK_DRAIN_AUDIT,
    TASK_RECORD_QUERIES,
    TASK_RUN_SCAN,
    TASK_SCORE_ALL,
    TASK_SCORE_CLIENT,
    TASK_SYNC_REGISTRY,
    TASK_WAKE_AUDIT,
)
from shared.netguard import parse_host_list
from shared.priority import wait_while_busy
from shared.schemas import QueryBatch

logger = logging.getLogger(__name__)

settings = AuditorSettings()
app = create_celery_app(settings, main="modelprint-auditor")
app.conf.beat_schedule = {
    "sync-registry": {
        "task": TASK_SYNC_REGISTRY,
        "schedule": settings.registry_sync_seconds,
        "options": {"queue": QUEUE_AUDIT, "expires": settings.registry_sync_seconds},
    },
    "dispatch-scans": {
        "task": TASK_DISPATCH_SCANS,
        "schedule": settings.scan_dispatch_seconds,
        # On the scans queue: the audit queue carries query records and must not wait behind scans.
        "options": {"queue": QUEUE_SCANS, "expires": settings.scan_dispatch_seconds},
    },
    "wake-audit-drain": {
        "task": TASK_WAKE_AUDIT,
        "schedule": settings.audit_outbox_check_seconds,
        "options": {"queue": QUEUE_AUDIT, "expires": settings.audit_outbox_check_seconds},
    },
    "score-clients": {
        "task": TASK_SCORE_ALL,
        "schedule": settings.suspicion_beat_seconds,
        # Scoring has its own queue and worker: the audit queue carries query records and must not wait
        # behind the detectors (a catch-up of 20,000 rows takes seconds).
        "options": {"queue": QUEUE_SCORING, "expires": settings.suspicion_beat_seconds},
    },
}
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
# Errors that one audit message's content causes (PostgreSQL refusing a value or a constraint, a batch
# not matching its client); any other error fails the drain, whose claims return after the lease.
REFUSED_DATA_ERRORS = (DataError, IntegrityError, ValueError)
# A drain hands over to a fresh task after this long (see drain_audit_outbox).
DRAIN_BUDGET_SECONDS = 5.0
# Drain tasks the beat queues expire after this long, so they do not pile up while no worker runs.
WAKE_EXPIRES_SECONDS = 60
# A waiting scoring's mark outlives its wait (the delay and the time it may yield to the load) by this.
SCORING_MARK_SECONDS = 60
profiles = suspicion.ProfileCache()
kits = scans.KitCache()


@lru_cache(maxsize=1)
def registry_client() -> redis.Redis:
    """This process's Redis connection (registry and alert stream)."""
    return redis.Redis.from_url(settings.require_redis_url())


def _database_url() -> str:
    return settings.require_database_url()


@worker_init.connect
def _compile_detector_kernels(**_: Any) -> None:
    """Compile the detector kernels before the first task (inherited by prefork children)."""
    from services.auditor import detector_kernels

    detector_kernels.warm_up()


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    configure_logging("auditor", settings.log_level, settings.log_format, settings.log_each_task)
    tune_garbage_collector()


@app.task(
    name=TASK_DRAIN_AUDIT,
    autoretry_for=(*TRANSIENT_DB_ERRORS, redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def drain_audit_outbox() -> int:
    """Store the audit messages waiting in the outbox, several per transaction, until none waits.

    Queued by the inference worker that found no drain queued (shared/audit_outbox.py). It lingers
    `audit_drain_linger_ms` before its first claim, and again after any claim that did not fill a
    transaction, so that under steady load each transaction holds that long's worth of jobs instead
    of the one or two answered while the previous one was stored. The drain ends with the claim that
    finds nothing (which clears the "drain queued" flag); after `DRAIN_BUDGET_SECONDS` it queues a
    successor and returns instead, so that the other tasks of the audit queue (webhooks, the registry
    sync) get their turn during a long stretch of load.
    """
    client = registry_client()
    deadline = time.monotonic() + DRAIN_BUDGET_SECONDS
    linger = settings.audit_drain_linger_ms / 1000
    limit = settings.audit_drain_messages
    inserted = 0
    if linger:
        # Jobs answered meanwhile join this drain (the flag stays set, so they queue no other).
        time.sleep(linger)
    while True:
        entries = audit_outbox.claim(client, limit, settings.audit_outbox_lease_seconds)
        if not entries:
            return inserted
        inserted += store_outbox_entries(client, entries)
        if time.monotonic() > deadline:
            # The flag is still set (the claim renewed it): puts queue no drain, so this one hands over.
            app.send_task(TASK_DRAIN_AUDIT, queue=QUEUE_AUDIT)
            return inserted
        if linger and len(entries) < limit:
            time.sleep(linger)


def store_outbox_entries(client: redis.Redis, entries: list[tuple[str, dict[str, Any]]]) -> int:
    """Store claimed outbox messages in one transaction, then forget them; returns rows inserted.

    A message that does not parse (written by an incompatible version), or that PostgreSQL refuses
    for a reason other than an outage, is moved aside with an error logged, instead of failing every
    transaction it is claimed into; the other messages of its drain are stored.
    """
    messages: list[tuple[str, list[QueryBatch]]] = []
    for outbox_id, payload in entries:
        try:
            messages.append((outbox_id, [QueryBatch.model_validate(raw) for raw in payload["batches"]]))
        except (KeyError, TypeError, ValidationError) as exc:
            _reject(client, outbox_id, exc)
    if not messages:
        return 0
    outbox_ids = [outbox_id for outbox_id, _ in messages]
    try:
        return commit_batches([batch for _, batches in messages for batch in batches], outbox_ids)
    except TRANSIENT_DB_ERRORS:
        _release_quietly(client, outbox_ids)
        raise
    except REFUSED_DATA_ERRORS as exc:
        if len(messages) == 1:
            _reject(client, outbox_ids[0], exc)
            return 0
        logger.warning("a drain's transaction was refused; storing its messages one by one")
    inserted = 0
    for index, (outbox_id, batches) in enumerate(messages):
        try:
            inserted += commit_batches(batches, [outbox_id])
        except TRANSIENT_DB_ERRORS:
            _release_quietly(client, outbox_ids[index:])
            raise
        except REFUSED_DATA_ERRORS as exc:
            _reject(client, outbox_id, exc)
    return inserted


def _release_quietly(client: redis.Redis, outbox_ids: list[str]) -> None:
    """Make claimed messages claimable again at once, for the retry, instead of after the lease."""
    with contextlib.suppress(redis.RedisError):
        audit_outbox.release(client, outbox_ids)


def _reject(client: redis.Redis, outbox_id: str, error: Exception) -> None:
    audit_outbox.reject(client, outbox_id)
    logger.error(
        "audit message that cannot be stored moved to the outbox's rejected hash",
        extra={"outbox_id": outbox_id, "error": repr(error)},
    )


@app.task(
    name=TASK_RECORD_QUERIES,
    autoretry_for=TRANSIENT_DB_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def record_queries(**payload: Any) -> int:
    """Store audit batches carried in the message itself (as versions before the drain sent them).

    The payload is `{"batches": [QueryBatch, ...], "outbox_id": ...}`, or one QueryBatch.
    """
    raw_batches = payload["batches"] if "batches" in payload else [payload]
    batches = [QueryBatch.model_validate(raw) for raw in raw_batches]
    return commit_batches(batches, [str(payload["outbox_id"])] if "outbox_id" in payload else [])


def commit_batches(batches: list[QueryBatch], outbox_ids: list[str]) -> int:
    """Store batches in one transaction (a redelivery inserts nothing twice), then clear their outbox
    entries, report the lag and queue scoring where due; returns the rows inserted."""
    with session_scope(_database_url()) as session:
        stored = service.store_query_batches(session, batches)
    # After the commit, in one Redis round trip: clear the outbox entries and report the lag. Best
    # effort: the rows are committed, and a Redis hiccup must not fail or repeat the task (an entry
    # left in the outbox is claimed again after its lease and then stores nothing twice).
    try:
        with registry_client().pipeline(transaction=True) as pipe:
            audit_outbox.remove(pipe, outbox_ids)
            report_audit_lag(pipe, batches)
            pipe.execute()
    except redis.RedisError as exc:
        logger.warning(
            "could not clear the audit outbox entries or report the lag", extra={"error": str(exc)}
        )
    every = settings.suspicion_every
    for client_id, result in stored.items():
        if result.inserted and result.length_before // every != result.length_after // every:
            queue_scoring(client_id)
    return sum(result.inserted for result in stored.values())


# The lag hash disappears this long after the last report (a restarted worker's old field goes with it).
AUDIT_LAG_TTL_SECONDS = 60


def report_audit_lag(pipe: redis.client.Pipeline, batches: list[QueryBatch]) -> None:
    """Queue on `pipe` this worker's lag, for the gateways' admission control.

    Each worker process writes its own field; a gateway takes the largest recent one.
    """
    lag = (datetime.now(UTC) - min(batch.answered_at for batch in batches)).total_seconds()
    field = f"{socket.gethostname()}:{os.getpid()}"
    pipe.hset(REDIS_AUDIT_LAG, field, f"{max(lag, 0.0):.3f} {time.time():.3f}")
    pipe.expire(REDIS_AUDIT_LAG, AUDIT_LAG_TTL_SECONDS)


def claim_scoring(client: redis.Redis, client_id: int) -> bool:
    """True if no scoring of the client is waiting on the queue (and mark one as waiting).

    A waiting scoring covers every row stored before it starts, so a second one would only repeat
    it; under heavy traffic (one trigger per `suspicion_every` rows) this keeps the scoring worker
    catching up in large blocks instead of rescoring. The mark expires, so a lost task cannot stop
    scoring.
    """
    return bool(
        client.set(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}", 1, nx=True, ex=scoring_mark_seconds())
    )


def scoring_mark_seconds() -> int:
    """How long a waiting scoring's mark lives: past its delay and its longest yield to the load."""
    wait = settings.suspicion_delay_seconds + settings.scoring_yield_max_seconds
    return SCORING_MARK_SECONDS + math.ceil(wait)


def queue_scoring(client_id: int, waiting_since: float | None = None, follow_up: bool = False) -> None:
    """Queue a scoring of the client's new rows unless one is already waiting.

    `waiting_since` (Unix time): since when the rows it scores have waited; now by default. A job may
    yield to the machine's load until `scoring_yield_max_seconds` after it (`score_client_task`).
    A trigger's job starts `suspicion_delay_seconds` later, so that the triggers of that second join
    it; a `follow_up` (the rest of a full block) starts at once, since a block's worth of rows waits.
    """
    try:
        claimed = claim_scoring(registry_client(), client_id)
    except redis.RedisError:
        claimed = True  # queueing below reports the outage as before
    if claimed:
        delay = 0.0 if follow_up else settings.suspicion_delay_seconds
        score_client_task.apply_async(
            args=[client_id],
            kwargs={"waiting_since": time.time() if waiting_since is None else waiting_since},
            queue=QUEUE_SCORING,
            countdown=delay or None,
        )


@app.task(name=TASK_WAKE_AUDIT, autoretry_for=(redis.ConnectionError,), max_retries=3)
def wake_audit_drain() -> int:
    """Beat: queue a drain for outbox messages that no drain has come for (a drain task lost from the
    queue, or a worker that died holding a claim whose lease has run out)."""
    client = registry_client()
    waiting = audit_outbox.waiting(client, audit_outbox.FLAG_TTL_SECONDS)
    if waiting:
        # Expiring: during an audit worker outage these do not pile up (the beat sends more).
        app.send_task(TASK_DRAIN_AUDIT, queue=QUEUE_AUDIT, expires=WAKE_EXPIRES_SECONDS)
        logger.warning("audit messages waited for a drain; queued one", extra={"messages": waiting})
    return waiting


@app.task(name=TASK_SYNC_REGISTRY, autoretry_for=(*TRANSIENT_DB_ERRORS, redis.ConnectionError), max_retries=3)
def sync_registry() -> dict[str, int]:
    """Rewrite the gateway's registry in Redis from PostgreSQL."""
    with session_scope(_database_url()) as session:
        keys, models = service.sync_registry(session, registry_client())
    return {"api_keys": keys, "models": models}


@app.task(name=TASK_SCORE_CLIENT, autoretry_for=TRANSIENT_DB_ERRORS, retry_backoff=True, max_retries=5)
def score_client_task(client_id: int, waiting_since: float | None = None) -> int:
    """Score a client's new queries; raise or refresh an extraction_suspected alert on alarms.

    First it yields to the load (`shared/priority.py:wait_while_busy`): while the rest of the machine
    keeps more than `scoring_yield_above` of its CPUs busy, it waits, until `scoring_yield_max_seconds`
    after `waiting_since`. Triggers meanwhile join this job.
    """
    if waiting_since is not None:
        waited = wait_while_busy(
            settings.scoring_yield_above, waiting_since + settings.scoring_yield_max_seconds
        )
        if waited.waited >= 1.0:
            logger.info(
                "scoring waited for the machine's load",
                extra={
                    "client_id": client_id,
                    "waited_s": round(waited.waited, 2),
                    "busy_share": None if waited.busy is None else round(waited.busy, 2),
                    "reason": waited.reason,
                },
            )
    # From here on, newly stored rows need another scoring: let the next trigger queue one.
    with contextlib.suppress(redis.RedisError):
        registry_client().delete(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}")
    alarming: list[tuple[str, str, dict[str, Any]]] = []
    with session_scope(_database_url()) as session:
        scores = suspicion.score_client(session, client_id, profiles)
        client = session.get(Client, client_id)
        if scores is None or client is None:
            return 0
        alarming = [suspicion.alert_text(client, score) for score in scores if score.alarms]
    if any(score.more_waiting for score in scores):
        # A block was full: the rest of a burst must not wait for the client's next query (the beat
        # only picks clients whose history grew since their last scoring). At once: a block's worth
        # of rows is waiting already (after a delay each, catching up on a 20 s batch-80 burst took
        # 80 s, session 15). It joins the queue's end, so other clients' jobs go in between; its rows
        # have waited since this job's did, so it yields to the load no longer than this one could.
        queue_scoring(client_id, waiting_since, follow_up=True)
    for severity, message, evidence in alarming:
        raise_and_notify(
            alerts.KIND_EXTRACTION_SUSPECTED, severity, "client", str(client_id), message, evidence
        )
    return len(alarming)


@app.task(name=TASK_SCORE_ALL, autoretry_for=TRANSIENT_DB_ERRORS, max_retries=3)
def score_all() -> int:
    """Beat: queue scoring for every client whose history grew since it was last scored."""
    with session_scope(_database_url()) as session:
        client_ids = suspicion.clients_to_score(session)
    for client_id in client_ids:
        queue_scoring(client_id)
    return len(client_ids)


def raise_and_notify(
    kind: str, severity: str, subject_type: str, subject_id: str, message: str, evidence: dict[str, Any]
) -> int:
    """Raise (or merge) an alert, stream it to watchers, and queue webhook deliveries if it is news."""
    with session_scope(_database_url()) as session:
        raised = alerts.raise_alert(session, kind, severity, subject_type, subject_id, message, evidence)
        delivery_ids = alerts.queue_deliveries(session, raised.alert) if raised.notify else []
        alert = raised.alert
    alerts.publish_alert(registry_client(), alert, "alert" if alert.occurrences == 1 else "alert_updated")
    for delivery_id in delivery_ids:
        deliver_webhook.apply_async(args=[delivery_id], queue=QUEUE_AUDIT)
    logger.warning(
        "alert raised",
        extra={"alert_id": alert.id, "kind": kind, "severity": alert.severity, "subject": subject_id},
    )
    return alert.id


@app.task(name=TASK_DELIVER_WEBHOOK, bind=True, autoretry_for=TRANSIENT_DB_ERRORS, max_retries=None)
def deliver_webhook(self: Any, delivery_id: int) -> str:
    """POST one alert to one webhook; retried with exponential backoff until delivered or given up."""
    with session_scope(_database_url()) as session:
        status = alerts.attempt_delivery(
            session,
            delivery_id,
            parse_host_list(settings.webhook_allowed_hosts),
            settings.webhook_max_attempts,
        )
    if status == "retry":
        raise self.retry(countdown=min(300, 2 ** min(self.request.retries, 8)))
    return status


def scan_config() -> scans.ScanConfig:
    """The scan settings: keys, outbound probing limits, fingerprint strength and decision level."""
    limits = ProbeLimits(
        allowed_hosts=parse_host_list(settings.scan_allowed_hosts),
        max_probes=settings.scan_max_probes,
        batch_rows=settings.scan_batch_rows,
        timeout_seconds=settings.scan_timeout_seconds,
        max_response_bytes=settings.scan_max_response_bytes,
        retries=settings.scan_retries,
    )
    return scans.ScanConfig(
        secrets=load_secrets(settings),
        limits=limits,
        scheme=get_scheme(settings.fingerprint_scheme, settings.fingerprint_alpha),
        level=settings.scan_level,
        replay_rows=settings.scan_replay_rows,
    )


@app.task(
    name=TASK_RUN_SCAN,
    autoretry_for=TRANSIENT_DB_ERRORS,
    retry_backoff=True,
    max_retries=5,
    soft_time_limit=settings.scan_time_limit_seconds,
    time_limit=settings.scan_time_limit_seconds + 60,
)
def run_scan(scan_id: int) -> str:
    """Run one suspect scan; a `stolen` verdict raises a theft_detected alert."""
    scan = scans.execute_scan(session_factory(_database_url()), scan_id, scan_config(), kits)
    if scan.verdict == "stolen":
        with session_scope(_database_url()) as session:
            suspect = session.get(Suspect, scan.suspect_id)
            name = suspect.name if suspect else str(scan.suspect_id)
        raise_and_notify(
            alerts.KIND_THEFT_DETECTED,
            "critical",
            "suspect",
            str(scan.suspect_id),
            f"Suspect {name!r} serves a copy of our model (scan {scan.id}, p = {scan.p_value:.3g}). "
            f"Evidence report: /v1/scans/{scan.id}/report",
            {"scan_id": scan.id, "p_value": scan.p_value, "verdict": scan.verdict},
        )
    return scan.status


@app.task(name=TASK_DISPATCH_SCANS)
def dispatch_due_scans() -> int:
    """Beat: fail scans whose worker died, then queue every due scheduled suspect with no active scan."""
    # No retry on a database error: beat calls again in MODELPRINT_SCAN_DISPATCH_SECONDS.
    now = datetime.now(UTC)
    # A running scan is bounded by its hard time limit; one older than that (plus the broker's
    # redelivery delay) lost its worker and would block its suspect forever.
    hard_limit = settings.scan_time_limit_seconds + 60
    stale_after = timedelta(seconds=hard_limit + settings.broker_visibility_timeout)
    queued: list[int] = []
    with session_scope(_database_url()) as session:
        scans.fail_stale_scans(session, now - stale_after)
        for suspect in scans.due_suspects(session, now):
            scan, created = scans.queue_scan(session, suspect, "schedule")
            if created:
                queued.append(scan.id)
    for scan_id in queued:
        run_scan.apply_async(args=[scan_id], queue=QUEUE_SCANS)
    return len(queued)
