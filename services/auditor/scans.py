"""Suspect scans: registration, due-scan dispatch, and running the theft tests with an evidence report."""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.auditor import service
from services.auditor.probe import ProbeError, ProbeLimits, ProbeTarget, probe
from services.auditor.report import render_html
from services.auditor.scanstats import (
    ReferenceKit,
    ReplaySet,
    TestResult,
    build_reference_kit,
    run_scan_tests,
)
from shared.config import Secrets
from shared.db import Client, Model, ModelVersion, QueryRequest, Scan, Suspect
from shared.fingerprint import FingerprintScheme
from shared.modelfile import load_model_bytes

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"
ACTIVE_STATUSES = ("queued", "running")
# Without a suspected client: replay up to this many of the most active clients' queries each.
MAX_CLIENTS_WITHOUT_SUSPECT = 10
ROWS_PER_CLIENT_WITHOUT_SUSPECT = 200
MIN_REPLAY_ROWS = 50


def queue_scan(session: Session, suspect: Suspect, trigger: str) -> tuple[Scan, bool]:
    """A new queued scan, or the suspect's scan already queued/running (never two at once)."""
    active = session.scalar(
        select(Scan).where(Scan.suspect_id == suspect.id, Scan.status.in_(ACTIVE_STATUSES))
    )
    if active is not None:
        return active, False
    try:
        with session.begin_nested():
            scan = Scan(suspect_id=suspect.id, trigger=trigger, status="queued")
            session.add(scan)
            session.flush()
    except IntegrityError:
        # Another dispatcher queued one between our check and insert (the partial unique index).
        active = session.scalar(
            select(Scan).where(Scan.suspect_id == suspect.id, Scan.status.in_(ACTIVE_STATUSES))
        )
        assert active is not None
        return active, False
    if suspect.interval_seconds:
        suspect.next_scan_at = datetime.now(UTC) + timedelta(seconds=suspect.interval_seconds)
    return scan, True


def fail_stale_scans(session: Session, started_before: datetime) -> int:
    """Mark scans still 'running' since before `started_before` as failed: their worker is gone."""
    stale = list(
        session.scalars(
            select(Scan).where(Scan.status == "running", Scan.started_at < started_before).with_for_update()
        )
    )
    for scan in stale:
        scan.status, scan.finished_at = "failed", datetime.now(UTC)
        scan.error = "the scan worker stopped before the scan finished (killed or restarted); scan again"
        logger.warning("stale scan failed", extra={"scan_id": scan.id})
    return len(stale)


def due_suspects(session: Session, now: datetime) -> list[Suspect]:
    """Scheduled suspects whose next scan is due and that have no scan queued or running."""
    active = select(Scan.suspect_id).where(Scan.status.in_(ACTIVE_STATUSES))
    return list(
        session.scalars(
            select(Suspect).where(
                Suspect.paused.is_(False),
                Suspect.interval_seconds.is_not(None),
                (Suspect.next_scan_at.is_(None)) | (Suspect.next_scan_at <= now),
                Suspect.id.not_in(active),
            )
        )
    )


class KitCache:
    """Reference kits (independent models + control inputs) per model version, built once per process."""

    def __init__(self) -> None:
        self._kits: dict[tuple[str, int], ReferenceKit] = {}
        self._lock = threading.Lock()

    def get(self, version: ModelVersion, model_name: str) -> ReferenceKit:
        key = (model_name, version.version)
        with self._lock:
            if key not in self._kits:
                assert version.reference_data is not None
                with np.load(io.BytesIO(version.reference_data), allow_pickle=False) as archive:
                    features, labels = np.asarray(archive["X"], dtype=np.float64), np.asarray(archive["y"])
                self._kits[key] = build_reference_kit(features, labels, list(version.classes), seed=0)
            return self._kits[key]


# The sample: every (request, row) of the client's stored requests under the model, scheme and key,
# ordered by a hash of (request id, row index, seed) instead of random() so a scan can be re-run on
# the same rows; only the chosen rows' inputs are sliced out of their packed requests.
_SAMPLE_ROWS_SQL = text(
    "WITH chosen AS ("
    " SELECT q.id, g.i FROM query_requests q CROSS JOIN LATERAL generate_series(0, q.n_rows - 1) AS g(i)"
    " WHERE q.client_id = :client AND q.model_name = :model AND q.scheme = :scheme AND q.key_id = :key"
    " ORDER BY md5(q.request_id || ':' || g.i || ':' || :seed) LIMIT :limit"
    ") SELECT substring(q.inputs FROM c.i * (length(q.inputs) / q.n_rows) + 1"
    " FOR length(q.inputs) / q.n_rows) AS input"
    " FROM chosen c JOIN query_requests q ON q.id = c.id"
    " ORDER BY md5(q.request_id || ':' || c.i || ':' || :seed)"
)


def _sample_rows(
    session: Session, client_id: int, model_name: str, limit: int, marked_by: tuple[str, str], seed: int
) -> np.ndarray:
    """A sample of the client's logged inputs answered under (scheme, key id), reproducible per seed."""
    scheme_name, key_id = marked_by
    rows = session.execute(
        _SAMPLE_ROWS_SQL,
        {
            "client": client_id,
            "model": model_name,
            "scheme": scheme_name,
            "key": key_id,
            "seed": str(seed),
            "limit": limit,
        },
    ).all()
    if not rows:
        return np.empty((0, 0))
    return np.frombuffer(b"".join(row.input for row in rows), dtype="<f8").reshape(len(rows), -1)


def _replay_candidates(session: Session, suspect: Suspect, limit: int) -> list[tuple[int, int]]:
    """(client id, rows to replay): the suspected client, or the most active clients of the model."""
    if suspect.suspected_client_id is not None:
        return [(suspect.suspected_client_id, limit)]
    counts = session.execute(
        select(QueryRequest.client_id, func.sum(QueryRequest.n_rows))
        .where(QueryRequest.model_name == suspect.model_name)
        .group_by(QueryRequest.client_id)
        .having(func.sum(QueryRequest.n_rows) >= MIN_REPLAY_ROWS)
        .order_by(func.sum(QueryRequest.n_rows).desc())
        .limit(MAX_CLIENTS_WITHOUT_SUSPECT)
    ).all()
    return [(int(client_id), ROWS_PER_CLIENT_WITHOUT_SUSPECT) for client_id, _ in counts]


def _test_payload(test: TestResult) -> dict[str, Any]:
    payload = asdict(test)
    # run_scan_tests stores the Holm-adjusted p-value of every decided test in its details.
    payload["p_value_adjusted"] = test.details.get("p_value_adjusted")
    return payload


@dataclass(frozen=True)
class ScanConfig:
    """What a scan needs from the settings: keys, probing limits, fingerprint scheme, decision level."""

    secrets: Secrets
    limits: ProbeLimits
    scheme: FingerprintScheme
    level: float
    replay_rows: int


def execute_scan(sessions: sessionmaker[Session], scan_id: int, config: ScanConfig, kits: KitCache) -> Scan:
    """Run one scan to its end (done or failed) and store verdict, tests and report."""
    started = datetime.now(UTC)
    with sessions.begin() as session:
        scan = session.get(Scan, scan_id, with_for_update=True)
        if scan is None:
            raise LookupError(f"no scan {scan_id}")
        if scan.status in ("done", "failed"):
            return scan
        scan.status, scan.started_at = "running", started
    try:
        report = _run(sessions, scan_id, config, kits, started)
    except ProbeError as exc:
        return _finish_failed(sessions, scan_id, str(exc), started)
    except SoftTimeLimitExceeded:
        return _finish_failed(
            sessions,
            scan_id,
            "the scan ran longer than MODELPRINT_SCAN_TIME_LIMIT_SECONDS; lower MODELPRINT_SCAN_MAX_PROBES "
            "or MODELPRINT_SCAN_REPLAY_ROWS, or check how fast the suspect answers",
            started,
        )
    except Exception as exc:  # a scan must end in a state an operator can read, whatever happened
        logger.exception("scan failed", extra={"scan_id": scan_id})
        return _finish_failed(sessions, scan_id, f"internal error: {type(exc).__name__}: {exc}", started)
    with sessions.begin() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        scan.status = "done"
        scan.verdict = report["verdict"]
        scan.p_value = report["p_value"]
        scan.tests = report["tests"]
        scan.probes = report["probe_counts"]["total"]
        scan.report = report
        scan.report_html = render_html(report)
        scan.finished_at = datetime.now(UTC)
    return scan


def _finish_failed(sessions: sessionmaker[Session], scan_id: int, error: str, started: datetime) -> Scan:
    with sessions.begin() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        scan.status, scan.error, scan.finished_at = "failed", error, datetime.now(UTC)
        suspect = session.get(Suspect, scan.suspect_id)
        report = _report_header(scan, suspect, None, None, started)
        report.update({"status": "failed", "error": error, "tests": []})
        scan.report = report
        scan.report_html = render_html(report)
    logger.warning("scan failed", extra={"scan_id": scan_id, "error": error})
    return scan


def _report_header(
    scan: Scan, suspect: Suspect | None, model: Model | None, version: ModelVersion | None, started: datetime
) -> dict[str, Any]:
    return {
        "scan_id": scan.id,
        "status": scan.status,
        "verdict": None,
        "p_value": None,
        "level": None,
        "explanation": "",
        "suspect": {
            "id": suspect.id,
            "name": suspect.name,
            "url": suspect.url,
            "protocol": suspect.protocol,
            "remote_model": suspect.remote_model,
        }
        if suspect
        else None,
        "model": {
            "name": model.name,
            "version": version.version,
            "sha256": version.sha256,
            "classes": version.classes,
        }
        if model and version
        else None,
        "fingerprint": None,
        "client": None,
        "clients_tested": [],
        "probe_counts": {"control": 0, "replay": 0, "total": 0},
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "software_version": SOFTWARE_VERSION,
        "tests": [],
        "error": None,
    }


def _run(
    sessions: sessionmaker[Session], scan_id: int, config: ScanConfig, kits: KitCache, started: datetime
) -> dict[str, Any]:
    secrets, limits, scheme, level = config.secrets, config.limits, config.scheme, config.level
    with sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None
        suspect = session.get(Suspect, scan.suspect_id)
        if suspect is None:
            raise ProbeError("the suspect was deleted")
        model = session.scalar(select(Model).where(Model.name == suspect.model_name))
        if model is None or not model.versions:
            raise ProbeError(f"our model {suspect.model_name!r} is not deployed")
        version = model.versions[-1]
        if version.reference_data is None:
            raise ProbeError(
                f"model {model.name!r} v{version.version} has no reference data; redeploy it with "
                "--reference-data so scans can train independent reference models"
            )
        victim = load_model_bytes(version.artifact)
        kit = kits.get(version, model.name)
        key_id = secrets.active_key_id
        replay_inputs: list[tuple[Client, np.ndarray]] = []
        for client_id, limit in _replay_candidates(session, suspect, config.replay_rows):
            client = session.get(Client, client_id)
            rows = _sample_rows(session, client_id, model.name, limit, (scheme.name, key_id), seed=scan_id)
            if client is not None and rows.shape[0] > 0:
                replay_inputs.append((client, rows))
        chain = None
        if suspect.suspected_client_id is not None:
            verification = service.verify_chain(session, suspect.suspected_client_id)
            client = session.get(Client, suspect.suspected_client_id)
            chain = {
                "id": suspect.suspected_client_id,
                "name": client.name if client else None,
                "chain_length": verification.stored_length,
                "chain_head": verification.stored_head_hash,
                "chain_ok": verification.ok,
            }
        report = _report_header(scan, suspect, model, version, started)
        target = ProbeTarget(suspect.url, suspect.protocol, suspect.remote_model, dict(suspect.headers or {}))
        classes = list(version.classes)

    all_inputs = [kit.control_inputs, *(rows for _, rows in replay_inputs)]
    total = sum(block.shape[0] for block in all_inputs)
    if total > limits.max_probes:
        # Keep the control set whole; shrink the replays to fit the cap.
        room = max(0, limits.max_probes - kit.control_inputs.shape[0])
        share = room // max(1, len(replay_inputs))
        replay_inputs = [(client, rows[:share]) for client, rows in replay_inputs if share >= MIN_REPLAY_ROWS]
    control = probe(target, kit.control_inputs, classes, limits)
    replays = [
        ReplaySet(client_id=client.id, inputs=rows, suspect=probe(target, rows, classes, limits))
        for client, rows in replay_inputs
    ]
    outcome = run_scan_tests(
        victim,
        secrets.fingerprint_keys[key_id],
        scheme,
        kit,
        control,
        replays,
        level=level,
        rng=np.random.default_rng(scan_id),
    )
    replay_count = sum(replay.inputs.shape[0] for replay in replays)
    report.update(
        {
            "status": "done",
            "verdict": outcome.verdict,
            "p_value": outcome.p_value,
            "level": outcome.level,
            "explanation": outcome.explanation,
            "fingerprint": {"scheme": scheme.name, "key_id": key_id, "alpha": getattr(scheme, "alpha", None)},
            "client": chain,
            "clients_tested": [
                {"id": client.id, "name": client.name, "replayed": int(rows.shape[0])}
                for client, rows in replay_inputs
            ],
            "probe_counts": {
                "control": int(kit.control_inputs.shape[0]),
                "replay": replay_count,
                "total": int(kit.control_inputs.shape[0]) + replay_count,
            },
            "tests": [_test_payload(test) for test in outcome.tests],
            "finished_at": datetime.now(UTC).isoformat(),
        }
    )
    return _json_safe(report)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
