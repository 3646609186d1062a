"""Incremental extraction-suspicion scoring of a client's new queries, per model, with stored state."""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from services.auditor.detectors import DetectorResult, ReferenceProfile, default_detectors
from shared.db import Client, ClientChain, Model, ModelVersion, SuspicionState

logger = logging.getLogger(__name__)

# Rows scored per model in one job; a client further behind is caught up by the next jobs, which
# the job queues itself when its block was full (tasks.score_client_task).
MAX_ROWS_PER_JOB = 20_000
ADVISORY_LOCK_NAMESPACE = 7_311_001


class ProfileCache:
    """Reference profiles per model version, built once per process from the stored reference data."""

    def __init__(self) -> None:
        self._profiles: dict[tuple[str, int], ReferenceProfile | None] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, model_name: str) -> tuple[int, ReferenceProfile] | None:
        """The newest version of the model that has reference data, and its profile."""
        # The version alone first: the reference data (a megabyte or more) is read once per process.
        newest = (
            select(ModelVersion.id, ModelVersion.version)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == model_name, ModelVersion.reference_data.is_not(None))
            .order_by(ModelVersion.version.desc())
            .limit(1)
        )
        version = session.execute(newest).first()
        if version is None:
            return None
        key = (model_name, int(version.version))
        with self._lock:
            if key not in self._profiles:
                reference_data = session.scalar(
                    select(ModelVersion.reference_data).where(ModelVersion.id == version.id)
                )
                assert reference_data is not None
                with np.load(io.BytesIO(reference_data), allow_pickle=False) as archive:
                    self._profiles[key] = ReferenceProfile.from_reference(
                        np.asarray(archive["X"], dtype=np.float64)
                    )
            profile = self._profiles[key]
        return (key[1], profile) if profile is not None else None


@dataclass(frozen=True)
class ModelScore:
    """The detectors' current results for one client and model."""

    model_name: str
    results: list[DetectorResult]
    # The block read was full: more of the client's rows wait for this model (the caller queues
    # another job for them, after the usual delay).
    more_waiting: bool = False

    @property
    def alarms(self) -> list[DetectorResult]:
        return [result for result in self.results if result.alarm]


def _try_lock(session: Session, client_id: int) -> bool:
    # Two scoring jobs for one client must not interleave; the loser simply skips (the winner or the
    # next beat run picks up whatever arrived meanwhile).
    return bool(
        session.execute(
            text("SELECT pg_try_advisory_xact_lock(:namespace, :client_id)"),
            {"namespace": ADVISORY_LOCK_NAMESPACE, "client_id": client_id},
        ).scalar()
    )


def score_client(session: Session, client_id: int, profiles: ProfileCache) -> list[ModelScore] | None:
    """Run every detector on the client's queries stored since the last run; None if another run holds it."""
    if not _try_lock(session, client_id):
        return None
    states = {
        (state.model_name, state.detector): state
        for state in session.scalars(select(SuspicionState).where(SuspicionState.client_id == client_id))
    }
    model_names = _client_models(session, client_id)
    scores = []
    for model_name in model_names:
        profile_entry = profiles.get(session, model_name)
        if profile_entry is None:
            continue  # no reference data: the detectors have nothing to compare against
        _, profile = profile_entry
        detectors = default_detectors(profile)
        last_ids = [
            states[(model_name, detector.name)].last_record_id
            for detector in detectors
            if (model_name, detector.name) in states
        ]
        start_id = min(last_ids) if len(last_ids) == len(detectors) else 0
        ids, all_inputs, all_labels = _new_rows(session, client_id, model_name, start_id)
        results = []
        for detector in detectors:
            state = states.get((model_name, detector.name))
            last_id = state.last_record_id if state is not None else 0
            # The rows are in id order: this detector's new ones are a suffix (usually all of them;
            # the detectors share one set of rows instead of each rebuilding its own).
            first = int(np.searchsorted(ids, last_id, side="right"))
            if first == ids.size:
                if state is not None:
                    results.append(_stored_result(state))
                continue
            new_state, result = detector.update(
                state.state if state is not None else None, all_inputs[first:], all_labels[first:]
            )
            _save_state(session, client_id, model_name, new_state, result, int(ids[-1]))
            results.append(result)
        scores.append(ModelScore(model_name, results, more_waiting=ids.size >= MAX_ROWS_PER_JOB))
    return scores


# The models a client has queried, in name order: one probe of ix_query_records_client_id_model_name_id
# per model (a loose index scan), however long the history. The query it replaced listed the distinct
# models of the rows after the oldest state's last row, reading every one of them: the whole backlog
# of a client whose scoring had fallen behind, on every job.
_CLIENT_MODELS_SQL = (
    "WITH RECURSIVE models(name) AS ("
    " (SELECT model_name FROM query_records WHERE client_id = %(client)s ORDER BY model_name LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT q.model_name FROM query_records q"
    "  WHERE q.client_id = %(client)s AND q.model_name > m.name ORDER BY q.model_name LIMIT 1)"
    " FROM models m WHERE m.name IS NOT NULL"
    ") SELECT name FROM models WHERE name IS NOT NULL"
)


def _client_models(session: Session, client_id: int) -> list[str]:
    """The names of the models the client has queried (a model without reference data is skipped by
    the caller, and scored from its first row once it has some)."""
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor() as cursor:
        cursor.execute(_CLIENT_MODELS_SQL, {"client": client_id})
        return [str(name) for (name,) in cursor.fetchall()]


_NEW_ROWS_SQL = (
    "SELECT id, input, label_index FROM query_records"
    " WHERE client_id = %s AND model_name = %s AND id > %s ORDER BY id LIMIT %s"
)


def _new_rows(
    session: Session, client_id: int, model_name: str, after_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids, inputs and label indices of up to MAX_ROWS_PER_JOB of the client's rows after `after_id`.

    Read with a binary cursor inside the session's transaction: the inputs arrive as the stored bytes
    rather than hex text PostgreSQL encodes and the driver decodes, and the rows as plain tuples:
    2.6 against 5.6 µs per row for 20,000 rows, 8 against 12 for 1,600 (wall time, both sides).
    """
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor(binary=True) as cursor:
        cursor.execute(_NEW_ROWS_SQL, (client_id, model_name, after_id, MAX_ROWS_PER_JOB))
        rows = cursor.fetchall()
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    ids, inputs, labels = zip(*rows, strict=True)
    joined = b"".join(inputs)
    return (
        np.array(ids, dtype=np.int64),
        np.frombuffer(joined, dtype="<f8").reshape(len(rows), -1),
        np.array(labels, dtype=np.int64),
    )


def _stored_result(state: SuspicionState) -> DetectorResult:
    return DetectorResult(
        detector=state.detector,
        score=state.score,
        threshold=state.threshold,
        alarm=state.alarm,
        explanation=state.explanation,
        queries_seen=state.queries_seen,
        details=dict(state.details),
    )


def _save_state(
    session: Session, client_id: int, model_name: str, state: bytes, result: DetectorResult, last_id: int
) -> None:
    values: dict[str, Any] = {
        "state": state,
        "last_record_id": last_id,
        "queries_seen": result.queries_seen,
        "score": float(result.score),
        "threshold": float(result.threshold),
        "alarm": bool(result.alarm),
        "explanation": result.explanation,
        "details": result.details,
        "computed_at": datetime.now(UTC),
    }
    statement = insert(SuspicionState).values(
        client_id=client_id, model_name=model_name, detector=result.detector, **values
    )
    session.execute(
        statement.on_conflict_do_update(index_elements=["client_id", "model_name", "detector"], set_=values)
    )


def clients_to_score(session: Session) -> list[int]:
    """Clients whose chain grew since their last scoring (cheap: no scan of the query records)."""
    last_scored = (
        select(SuspicionState.client_id, func.max(SuspicionState.computed_at).label("scored_at"))
        .group_by(SuspicionState.client_id)
        .subquery()
    )
    statement = (
        select(ClientChain.client_id)
        .outerjoin(last_scored, last_scored.c.client_id == ClientChain.client_id)
        .where((last_scored.c.scored_at.is_(None)) | (ClientChain.updated_at > last_scored.c.scored_at))
    )
    return list(session.scalars(statement))


def client_suspicion(session: Session, client_id: int) -> dict[str, Any]:
    """A client's current suspicion: each detector's score, threshold, explanation and time, per model."""
    states = list(
        session.scalars(
            select(SuspicionState)
            .where(SuspicionState.client_id == client_id)
            .order_by(SuspicionState.model_name, SuspicionState.detector)
        )
    )
    models: dict[str, list[dict[str, Any]]] = {}
    for state in states:
        models.setdefault(state.model_name, []).append(
            {
                "detector": state.detector,
                "score": state.score,
                "threshold": state.threshold,
                "alarm": state.alarm,
                "explanation": state.explanation,
                "queries_seen": state.queries_seen,
                "details": state.details,
                "computed_at": state.computed_at.isoformat(),
            }
        )
    return {"client_id": client_id, "level": suspicion_level(states), "models": models}


def suspicion_level(states: list[SuspicionState]) -> str:
    """none (no alarm), suspected (one detector alarms) or high (several alarm for one model)."""
    alarms_per_model: dict[str, int] = {}
    for state in states:
        alarms_per_model[state.model_name] = alarms_per_model.get(state.model_name, 0) + int(state.alarm)
    worst = max(alarms_per_model.values(), default=0)
    return "none" if worst == 0 else "suspected" if worst == 1 else "high"


def levels_by_client(session: Session) -> dict[int, str]:
    """The suspicion level of every client that has been scored."""
    grouped: dict[int, list[SuspicionState]] = {}
    for state in session.scalars(select(SuspicionState)):
        grouped.setdefault(state.client_id, []).append(state)
    return {client_id: suspicion_level(states) for client_id, states in grouped.items()}


def alert_text(client: Client, score: ModelScore) -> tuple[str, str, dict[str, Any]]:
    """Severity, message and evidence of an extraction_suspected alert."""
    alarms = score.alarms
    severity = "critical" if len(alarms) >= 2 else "warning"
    reasons = " ".join(result.explanation for result in alarms)
    message = (
        f"Client {client.name!r} (id {client.id}) queries {score.model_name!r} like a model-extraction "
        f"attack: {len(alarms)} of {len(score.results)} detectors alarm. {reasons}"
    )
    evidence = {
        "model": score.model_name,
        "detectors": [
            {
                "detector": result.detector,
                "score": result.score,
                "threshold": result.threshold,
                "alarm": result.alarm,
                "queries_seen": result.queries_seen,
                "explanation": result.explanation,
            }
            for result in score.results
        ],
    }
    return severity, message, evidence
