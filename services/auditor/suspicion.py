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
        last_seqs = [
            states[(model_name, detector.name)].last_seq
            for detector in detectors
            if (model_name, detector.name) in states
        ]
        start_seq = min(last_seqs) if len(last_seqs) == len(detectors) else 0
        seqs, all_inputs, all_labels = _new_rows(session, client_id, model_name, start_seq)
        results = []
        for detector in detectors:
            state = states.get((model_name, detector.name))
            last_seq = state.last_seq if state is not None else 0
            # The rows are in chain order: this detector's new ones are a suffix (usually all of them;
            # the detectors share one set of rows instead of each rebuilding its own).
            first = int(np.searchsorted(seqs, last_seq, side="right"))
            if first == seqs.size:
                if state is not None:
                    results.append(_stored_result(state))
                continue
            new_state, result = detector.update(
                state.state if state is not None else None, all_inputs[first:], all_labels[first:]
            )
            _save_state(session, client_id, model_name, new_state, result, int(seqs[-1]))
            results.append(result)
        scores.append(ModelScore(model_name, results, more_waiting=seqs.size >= MAX_ROWS_PER_JOB))
    return scores


# The models a client has queried, in name order: one probe of
# ix_query_requests_client_id_model_name_first_seq per model (a loose index scan), however long the
# history. The query it replaced listed the distinct models of the rows after the oldest state's last
# row, reading every one of them: the whole backlog of a client whose scoring had fallen behind, on
# every job.
_CLIENT_MODELS_SQL = (
    "WITH RECURSIVE models(name) AS ("
    " (SELECT model_name FROM query_requests WHERE client_id = %(client)s ORDER BY model_name LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT q.model_name FROM query_requests q"
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


# The client's stored requests of one model from the one holding the row after a chain position on,
# in chain order: one probe for the last request starting at or before the position, then one ordered
# range of ix_query_requests_client_id_model_name_first_seq, read through a server-side cursor a few
# requests at a time until the job has its rows, so neither the rest of a backlog nor its packed
# inputs are read.
_NEW_ROWS_SQL = (
    "SELECT first_seq, inputs, label_indices FROM query_requests"
    " WHERE client_id = %(client)s AND model_name = %(model)s AND first_seq >= COALESCE("
    "  (SELECT max(first_seq) FROM query_requests"
    "   WHERE client_id = %(client)s AND model_name = %(model)s AND first_seq <= %(after)s), 0)"
    " ORDER BY first_seq"
)
# Requests fetched per round trip of the cursor (up to 80 rows each, at batch 80).
_NEW_ROWS_FETCH = 32


def _new_rows(
    session: Session, client_id: int, model_name: str, after_seq: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seqs, inputs and label indices of up to MAX_ROWS_PER_JOB of the client's rows of one model
    after chain position `after_seq`.

    Read with a binary cursor inside the session's transaction: the packed inputs arrive as the
    stored bytes rather than hex text PostgreSQL encodes and the driver decodes.
    """
    connection = session.connection().connection.driver_connection
    assert connection is not None
    seqs: list[np.ndarray] = []
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    total = 0
    with connection.cursor(name="modelprint_new_rows", binary=True) as cursor:
        cursor.itersize = _NEW_ROWS_FETCH
        cursor.execute(_NEW_ROWS_SQL, {"client": client_id, "model": model_name, "after": after_seq})
        for first_seq, packed, label_indices in cursor:
            n_rows = len(label_indices)
            skip = max(after_seq + 1 - first_seq, 0)
            take = min(n_rows - skip, MAX_ROWS_PER_JOB - total)
            if take <= 0:
                continue  # the request before the position, all of it seen already
            rows = np.frombuffer(packed, dtype="<f8").reshape(n_rows, -1)
            seqs.append(np.arange(first_seq + skip, first_seq + skip + take, dtype=np.int64))
            inputs.append(rows[skip : skip + take])
            labels.append(np.asarray(label_indices[skip : skip + take], dtype=np.int64))
            total += take
            if total >= MAX_ROWS_PER_JOB:
                break
    if not seqs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return np.concatenate(seqs), np.concatenate(inputs), np.concatenate(labels)


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
    session: Session, client_id: int, model_name: str, state: bytes, result: DetectorResult, last_seq: int
) -> None:
    values: dict[str, Any] = {
        "state": state,
        "last_seq": last_seq,
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
