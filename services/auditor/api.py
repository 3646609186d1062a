"""Operator API (port 8001): clients and keys, models, query histories. Bearer <admin token> on /v1."""

import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from services.auditor import alerts, scans, service, suspicion
from services.auditor.config import AuditorSettings
from services.auditor.schemas import (
    HEADER_NAME_PATTERN,
    ChainVerificationOut,
    ClientCreate,
    ClientCreated,
    ClientOut,
    DeliveryOut,
    ModelOut,
    ModelVersionOut,
    QueryPage,
    QueryRecordOut,
    ScanOut,
    SuspectCreate,
    SuspectOut,
    SuspectUpdate,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
)
from shared.celery_app import create_celery_app
from shared.config import load_secrets
from shared.db import Client, Model, ModelVersion, Scan, Suspect, Webhook, WebhookDelivery, session_factory
from shared.http import ApiError, install_error_handlers
from shared.modelfile import ModelFileError
from shared.names import QUEUE_SCANS, TASK_RUN_SCAN
from shared.netguard import UnsafeUrlError, check_outbound_url, parse_host_list
from shared.security import bearer_token, tokens_match

logger = logging.getLogger(__name__)

SSE_KEEPALIVE_SECONDS = 15.0
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


def _client_out(client: Client) -> ClientOut:
    return ClientOut(
        id=client.id,
        name=client.name,
        api_key_prefix=client.api_key_prefix,
        created_at=client.created_at,
        disabled=client.disabled_at is not None,
        disabled_at=client.disabled_at,
    )


def _version_out(name: str, version: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(
        name=name,
        version=version.version,
        sha256=version.sha256,
        n_features=version.n_features,
        classes=version.classes,
        estimator_type=version.estimator_type,
        reference_rows=version.reference_rows,
        created_at=version.created_at,
    )


def _model_out(model: Model) -> ModelOut:
    versions = [_version_out(model.name, version) for version in model.versions]
    return ModelOut(
        name=model.name, active_version=versions[-1].version if versions else None, versions=versions
    )


async def _read_upload(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{what} is larger than the limit of {limit} bytes (MODELPRINT_MAX_UPLOAD_BYTES)")
    if not data:
        raise ApiError(422, f"{what} is empty")
    return data


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"id: {payload['id']}\nevent: {event}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def _webhook_out(webhook: Webhook) -> WebhookOut:
    return WebhookOut(
        id=webhook.id,
        url=webhook.url,
        description=webhook.description,
        active=webhook.active,
        created_at=webhook.created_at,
    )


def _suspect_out(suspect: Suspect) -> SuspectOut:
    return SuspectOut(
        id=suspect.id,
        name=suspect.name,
        url=suspect.url,
        protocol=suspect.protocol,
        model=suspect.model_name,
        remote_model=suspect.remote_model,
        suspected_client_id=suspect.suspected_client_id,
        interval_seconds=suspect.interval_seconds,
        paused=suspect.paused,
        header_names=sorted(suspect.headers or {}),
        created_at=suspect.created_at,
        next_scan_at=suspect.next_scan_at,
    )


def _scan_out(scan: Scan) -> ScanOut:
    return ScanOut.model_validate(scan, from_attributes=True)


def create_app(settings: AuditorSettings | None = None) -> FastAPI:
    """The operator API application."""
    settings = settings or AuditorSettings()
    admin_token = load_secrets(settings).admin_token
    sessions = session_factory(settings.require_database_url())
    registry = redis.Redis.from_url(settings.require_redis_url())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Repair the gateway's view of keys and models at start (Redis may have been wiped).
        with sessions.begin() as session:
            keys, models = service.sync_registry(session, registry)
        logger.info("registry synced", extra={"api_keys": keys, "models": models})
        yield
        registry.close()

    app = FastAPI(
        title="modelprint operator API",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(
                401, "missing 'Authorization: Bearer <admin token>' header", {"WWW-Authenticate": "Bearer"}
            )
        if not tokens_match(token, admin_token):
            raise ApiError(401, "invalid admin token", {"WWW-Authenticate": "Bearer"})

    def db_session() -> Iterator[Session]:
        session = sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # scope="function": commit before the response is sent, so a client that reads back what it just
    # wrote (or a task queued right after) sees it; the default scope commits after the response.
    SessionDep = Annotated[Session, Depends(db_session, scope="function")]
    admin = [Depends(require_admin)]

    @app.get("/healthz")
    def healthz(session: SessionDep) -> dict[str, str]:
        session.execute(text("SELECT 1"))
        registry.ping()
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/clients", status_code=201, dependencies=admin)
    def create_client(body: ClientCreate, session: SessionDep) -> ClientCreated:
        created = service.create_client(session, body.name)
        session.commit()
        service.publish_client(registry, created.client)
        return ClientCreated(**_client_out(created.client).model_dump(), api_key=created.api_key)

    @app.get("/v1/clients", dependencies=admin)
    def list_clients(session: SessionDep) -> list[ClientOut]:
        levels = suspicion.levels_by_client(session)
        return [
            _client_out(client).model_copy(update={"suspicion": levels.get(client.id, "none")})
            for client in service.list_clients(session)
        ]

    def _client_or_404(session: Session, client_id: int) -> Client:
        try:
            return service.get_client(session, client_id)
        except service.NotFoundError as exc:
            raise ApiError(404, str(exc)) from exc

    @app.get("/v1/clients/{client_id}", dependencies=admin)
    def get_client(client_id: int, session: SessionDep) -> ClientOut:
        return _client_out(_client_or_404(session, client_id))

    @app.post("/v1/clients/{client_id}/disable", dependencies=admin)
    def disable_client(client_id: int, session: SessionDep) -> ClientOut:
        _client_or_404(session, client_id)
        client = service.set_client_disabled(session, registry, client_id, disabled=True)
        return _client_out(client)

    @app.post("/v1/clients/{client_id}/enable", dependencies=admin)
    def enable_client(client_id: int, session: SessionDep) -> ClientOut:
        _client_or_404(session, client_id)
        client = service.set_client_disabled(session, registry, client_id, disabled=False)
        session.commit()
        service.publish_client(registry, client)
        return _client_out(client)

    @app.get("/v1/clients/{client_id}/queries", dependencies=admin)
    def list_queries(
        client_id: int,
        session: SessionDep,
        after_id: Annotated[
            int, Query(ge=0, description="Cursor: the last id (the row's seq) of the previous page")
        ] = 0,
        limit: Annotated[int, Query(ge=1)] = 100,
    ) -> QueryPage:
        if limit > settings.audit_page_limit:
            raise ApiError(422, f"limit must be at most {settings.audit_page_limit}")
        _client_or_404(session, client_id)
        records = service.list_queries(session, client_id, after_id, limit)
        return QueryPage(
            client_id=client_id,
            queries=[
                QueryRecordOut(
                    id=record.seq,
                    seq=record.seq,
                    request_id=record.request_id,
                    row_index=record.row_index,
                    model=record.model_name,
                    model_version=record.model_version,
                    scheme=record.scheme,
                    key_id=record.key_id,
                    answered_at=record.answered_at,
                    input=service.floats(record.input),
                    probabilities=service.floats(record.probabilities),
                    label=record.label,
                )
                for record in records
            ],
            next_after_id=records[-1].seq if len(records) == limit else None,
        )

    @app.get("/v1/clients/{client_id}/suspicion", dependencies=admin)
    def client_suspicion(client_id: int, session: SessionDep) -> dict[str, Any]:
        _client_or_404(session, client_id)
        return suspicion.client_suspicion(session, client_id)

    @app.get("/v1/clients/{client_id}/history/verify", dependencies=admin)
    def verify_history(client_id: int, session: SessionDep) -> ChainVerificationOut:
        _client_or_404(session, client_id)
        return ChainVerificationOut(**asdict(service.verify_chain(session, client_id)))

    @app.get("/v1/clients/{client_id}/queries/export", dependencies=admin)
    def export_queries(
        client_id: int,
        session: SessionDep,
        format: Annotated[Literal["jsonl", "npz"], Query(description="jsonl (streamed) or npz")] = "jsonl",
    ) -> Response:
        _client_or_404(session, client_id)
        filename = f"client-{client_id}-queries.{format}"
        headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
        if format == "npz":
            with sessions() as export_session:
                content = service.export_npz(export_session, client_id)
            return Response(content, media_type="application/octet-stream", headers=headers)
        return StreamingResponse(_jsonl_lines(client_id), media_type="application/x-ndjson", headers=headers)

    def _jsonl_lines(client_id: int) -> Iterator[bytes]:
        # A session of its own: the request's session is closed once the response starts streaming.
        with sessions() as export_session:
            for record in service.iter_queries(export_session, client_id):
                yield orjson.dumps(service.record_export(record)) + b"\n"

    # -- alerts ------------------------------------------------------------------------------------

    @app.get("/v1/alerts", dependencies=admin)
    def list_alerts(
        session: SessionDep,
        status: Annotated[Literal["open", "acknowledged"] | None, Query()] = None,
        kind: Annotated[str | None, Query(max_length=50)] = None,
        since: Annotated[
            datetime | None, Query(description="Only alerts updated at or after this time")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        return [
            alerts.alert_payload(alert) for alert in alerts.list_alerts(session, status, kind, since, limit)
        ]

    @app.post("/v1/alerts/{alert_id}/ack", dependencies=admin)
    def acknowledge_alert(alert_id: int, session: SessionDep) -> dict[str, Any]:
        alert = alerts.acknowledge(session, alert_id)
        if alert is None:
            raise ApiError(404, f"no alert with id {alert_id}")
        session.commit()
        alerts.publish_alert(registry, alert, "alert_acknowledged")
        return alerts.alert_payload(alert)

    @app.get("/v1/alerts/stream", dependencies=admin)
    async def stream_alerts(
        request: Request,
        last_event_id: Annotated[str | None, Header()] = None,
        after_id: Annotated[
            int | None, Query(ge=0, description="Replay alerts with larger ids first")
        ] = None,
    ) -> StreamingResponse:
        cursor = after_id
        if cursor is None and last_event_id and last_event_id.isdigit():
            cursor = int(last_event_id)
        return StreamingResponse(
            _alert_events(request, cursor),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _alert_events(request: Request, cursor: int | None) -> AsyncIterator[bytes]:
        client = aioredis.Redis.from_url(settings.require_redis_url())
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            # Subscribe before replaying, so nothing raised in between is missed.
            await pubsub.subscribe(alerts.ALERT_CHANNEL)
            if cursor is not None:
                backlog = await run_in_threadpool(_backlog, cursor)
                for payload in backlog:
                    yield _sse("alert", payload)
            yield b": connected\n\n"
            last_sent = time.monotonic()
            while not await request.is_disconnected():
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    event = orjson.loads(message["data"])
                    yield _sse(event["event"], event["alert"])
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent > SSE_KEEPALIVE_SECONDS:
                    yield b": keep-alive\n\n"
                    last_sent = time.monotonic()
        finally:
            await pubsub.aclose()
            await client.aclose()

    def _backlog(cursor: int) -> list[dict[str, Any]]:
        with sessions() as session:
            return [alerts.alert_payload(alert) for alert in alerts.alerts_after(session, cursor)]

    # -- webhooks ----------------------------------------------------------------------------------

    webhook_hosts = parse_host_list(settings.webhook_allowed_hosts)

    @app.post("/v1/webhooks", status_code=201, dependencies=admin)
    def create_webhook(body: WebhookCreate, session: SessionDep) -> WebhookCreated:
        try:
            created = alerts.create_webhook(session, str(body.url), body.description, webhook_hosts)
        except UnsafeUrlError as exc:
            raise ApiError(422, f"webhook URL refused: {exc}") from exc
        session.commit()
        return WebhookCreated(
            **_webhook_out(created.webhook).model_dump(), signing_secret=created.signing_secret
        )

    @app.get("/v1/webhooks", dependencies=admin)
    def list_webhooks(session: SessionDep) -> list[WebhookOut]:
        return [_webhook_out(webhook) for webhook in session.scalars(select(Webhook).order_by(Webhook.id))]

    @app.delete("/v1/webhooks/{webhook_id}", dependencies=admin)
    def deactivate_webhook(webhook_id: int, session: SessionDep) -> WebhookOut:
        webhook = session.get(Webhook, webhook_id)
        if webhook is None:
            raise ApiError(404, f"no webhook with id {webhook_id}")
        webhook.active = False
        return _webhook_out(webhook)

    @app.get("/v1/webhooks/{webhook_id}/deliveries", dependencies=admin)
    def list_deliveries(webhook_id: int, session: SessionDep) -> list[DeliveryOut]:
        if session.get(Webhook, webhook_id) is None:
            raise ApiError(404, f"no webhook with id {webhook_id}")
        deliveries = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook_id)
            .order_by(WebhookDelivery.id.desc())
            .limit(200)
        )
        return [DeliveryOut.model_validate(delivery, from_attributes=True) for delivery in deliveries]

    # -- suspects and scans ---------------------------------------------------------------------

    scan_hosts = parse_host_list(settings.scan_allowed_hosts)
    celery = create_celery_app(settings, main="modelprint-auditor-api")

    def _suspect_or_404(session: Session, suspect_id: int) -> Suspect:
        suspect = session.get(Suspect, suspect_id)
        if suspect is None:
            raise ApiError(404, f"no suspect with id {suspect_id}")
        return suspect

    def _check_suspect(session: Session, url: str | None, model: str | None, client_id: int | None) -> None:
        if url is not None:
            try:
                check_outbound_url(url, scan_hosts, "MODELPRINT_SCAN_ALLOWED_HOSTS")
            except UnsafeUrlError as exc:
                raise ApiError(422, f"suspect URL refused: {exc}") from exc
        if model is not None and session.scalar(select(Model).where(Model.name == model)) is None:
            raise ApiError(422, f"no model named {model!r} is deployed here")
        if client_id is not None and session.get(Client, client_id) is None:
            raise ApiError(422, f"no client with id {client_id}")

    def _check_headers(headers: dict[str, str] | None) -> None:
        if headers is None:
            return
        if len(headers) > 20 or any(not re.fullmatch(HEADER_NAME_PATTERN, name) for name in headers):
            raise ApiError(422, "headers: at most 20, names of letters, digits and dashes")

    @app.post("/v1/suspects", status_code=201, dependencies=admin)
    def create_suspect(body: SuspectCreate, session: SessionDep) -> SuspectOut:
        _check_suspect(session, str(body.url), body.model, body.suspected_client_id)
        _check_headers(body.headers)
        suspect = Suspect(
            name=body.name,
            url=str(body.url),
            protocol=body.protocol,
            model_name=body.model,
            remote_model=body.remote_model or body.model,
            suspected_client_id=body.suspected_client_id,
            interval_seconds=body.interval_seconds,
            headers=body.headers,
            paused=False,
        )
        session.add(suspect)
        session.flush()
        return _suspect_out(suspect)

    @app.get("/v1/suspects", dependencies=admin)
    def list_suspects(session: SessionDep) -> list[SuspectOut]:
        return [_suspect_out(s) for s in session.scalars(select(Suspect).order_by(Suspect.id))]

    @app.get("/v1/suspects/{suspect_id}", dependencies=admin)
    def get_suspect(suspect_id: int, session: SessionDep) -> SuspectOut:
        return _suspect_out(_suspect_or_404(session, suspect_id))

    @app.patch("/v1/suspects/{suspect_id}", dependencies=admin)
    def update_suspect(suspect_id: int, body: SuspectUpdate, session: SessionDep) -> SuspectOut:
        suspect = _suspect_or_404(session, suspect_id)
        changes = body.model_dump(exclude_unset=True)
        _check_suspect(session, str(body.url) if body.url else None, None, body.suspected_client_id)
        _check_headers(body.headers)
        for field, value in changes.items():
            setattr(suspect, field, str(value) if field == "url" else value)
        if "interval_seconds" in changes or changes.get("paused") is False:
            suspect.next_scan_at = None  # due at the next dispatch
        session.flush()
        return _suspect_out(suspect)

    @app.delete("/v1/suspects/{suspect_id}", status_code=204, dependencies=admin)
    def delete_suspect(suspect_id: int, session: SessionDep) -> Response:
        session.delete(_suspect_or_404(session, suspect_id))
        return Response(status_code=204)

    @app.post("/v1/suspects/{suspect_id}/scans", status_code=202, dependencies=admin)
    def scan_now(suspect_id: int, session: SessionDep) -> ScanOut:
        suspect = _suspect_or_404(session, suspect_id)
        scan, created = scans.queue_scan(session, suspect, "manual")
        session.commit()
        if created:
            try:
                celery.send_task(TASK_RUN_SCAN, args=[scan.id], queue=QUEUE_SCANS)
            except Exception as exc:  # the broker is down: do not leave a queued scan nobody will run
                scan.status, scan.finished_at = "failed", datetime.now(UTC)
                scan.error = f"could not queue the scan: {type(exc).__name__}"
                session.commit()
                raise ApiError(503, "the task broker (Redis) is unreachable; try again shortly") from exc
        return _scan_out(scan)

    @app.get("/v1/suspects/{suspect_id}/scans", dependencies=admin)
    def list_scans(suspect_id: int, session: SessionDep) -> list[ScanOut]:
        _suspect_or_404(session, suspect_id)
        rows = session.scalars(
            select(Scan).where(Scan.suspect_id == suspect_id).order_by(Scan.id.desc()).limit(100)
        )
        return [_scan_out(scan) for scan in rows]

    def _scan_or_404(session: Session, scan_id: int) -> Scan:
        scan = session.get(Scan, scan_id)
        if scan is None:
            raise ApiError(404, f"no scan with id {scan_id}")
        return scan

    @app.get("/v1/scans/{scan_id}", dependencies=admin)
    def get_scan(scan_id: int, session: SessionDep) -> ScanOut:
        return _scan_out(_scan_or_404(session, scan_id))

    @app.get("/v1/scans/{scan_id}/report", dependencies=admin, response_model=None)
    def scan_report(
        scan_id: int, session: SessionDep, format: Annotated[Literal["html", "json"], Query()] = "html"
    ) -> Response | dict[str, Any]:
        scan = _scan_or_404(session, scan_id)
        if scan.report is None:
            raise ApiError(
                409, f"scan {scan_id} is {scan.status}; the report exists once it is done or failed"
            )
        if format == "json":
            return scan.report
        return Response(scan.report_html or "", media_type="text/html; charset=utf-8")

    @app.post("/v1/models", status_code=201, dependencies=admin)
    async def deploy_model(
        request: Request,
        name: Annotated[str, Form(pattern=MODEL_NAME_PATTERN, description="Model name used in URLs")],
        file: Annotated[UploadFile, File(description="A scikit-learn classifier saved with skops")],
        reference_data: Annotated[UploadFile | None, File(description=".npz with arrays X and y")] = None,
    ) -> ModelVersionOut:
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_upload_bytes * 2:
            raise ApiError(413, f"upload is larger than the limit of {settings.max_upload_bytes} bytes")
        artifact = await _read_upload(file, settings.max_upload_bytes, "the model file")
        reference = (
            await _read_upload(reference_data, settings.max_upload_bytes, "the reference data")
            if reference_data is not None
            else None
        )
        try:
            return await run_in_threadpool(_deploy, name, artifact, reference)
        except ModelFileError as exc:
            raise ApiError(422, str(exc)) from exc

    def _deploy(name: str, artifact: bytes, reference: bytes | None) -> ModelVersionOut:
        with sessions.begin() as session:
            version = service.deploy_model(session, name, artifact, reference)
        service.publish_version(registry, name, version)
        return _version_out(name, version)

    @app.get("/v1/models", dependencies=admin)
    def list_models(session: SessionDep) -> list[ModelOut]:
        return [_model_out(model) for model in service.list_models(session)]

    @app.get("/v1/models/{name}", dependencies=admin)
    def get_model(name: str, session: SessionDep) -> ModelOut:
        try:
            return _model_out(service.get_model(session, name))
        except service.NotFoundError as exc:
            raise ApiError(404, str(exc)) from exc

    return app
