"""Public prediction API (port 8000): modelprint's /v1 format and the Open Inference Protocol (/v2)."""

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Header, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import service
from services.gateway.config import GatewaySettings
from services.gateway.registry_cache import RegistryCache
from shared.celery_app import create_celery_app
from shared.gc_tuning import tune_garbage_collector
from shared.http import OrjsonResponse, install_error_handlers
from shared.schemas import DeployedModel, PredictReply

logger = logging.getLogger(__name__)

REQUESTS = Counter("modelprint_gateway_requests_total", "Requests by route and status", ["route", "status"])
ROWS = Counter("modelprint_gateway_rows_total", "Rows answered", ["model"])
LATENCY = Histogram(
    "modelprint_gateway_request_seconds",
    "Request latency by route",
    ["route"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)

AUDIT_LAG = Gauge(
    "modelprint_gateway_audit_lag_seconds",
    "Largest lag (answer to commit) the audit workers reported in the last 2 s; 0 when none did",
)
ADMISSION_RATE = Gauge(
    "modelprint_gateway_admission_rate_rows", "Rows per second the gateway lets in; -1 when not paced"
)
ADMITTED_ROWS = Gauge("modelprint_gateway_admitted_rows", "Rows let in since the gateway started")
REGISTRY_CACHE_HITS = Gauge(
    "modelprint_gateway_registry_cache_hits", "Predictions that found key, model and queue length cached"
)
REGISTRY_CACHE_MISSES = Gauge(
    "modelprint_gateway_registry_cache_misses", "Predictions that read key, model and queue length from Redis"
)
ADMISSION_REFUSED = Gauge(
    "modelprint_gateway_admission_refused", "Requests refused (503) while the audit trail was behind"
)


def _labels(model: DeployedModel, reply: PredictReply) -> list[Any]:
    return [model.classes[index] for index in reply.label_indices]


class MetricsMiddleware:
    """Counts requests and observes latency by route (plain ASGI: BaseHTTPMiddleware costs ~0.2 ms)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route_path = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(route_path).observe(time.perf_counter() - started)
            REQUESTS.labels(route_path, str(status)).inc()


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway application."""
    settings = settings or GatewaySettings()
    # After a Redis restart every pooled connection fails once; retry such errors (all the gateway's
    # commands are reads) instead of answering 503 for each stale connection.
    redis_client = aioredis.Redis.from_url(
        settings.require_redis_url(),
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    celery = create_celery_app(settings, main="modelprint-gateway")
    dispatcher = service.Dispatcher(
        celery,
        redis_client,
        settings.predict_timeout_seconds,
        settings.max_inference_backlog,
        window=settings.micro_batch_window_ms / 1000,
        max_job_rows=settings.micro_batch_max_rows,
        eager_jobs=settings.micro_batch_eager_jobs,
        send_lone=settings.micro_batch_send_lone,
        admission=service.AdmissionControl(settings.audit_lag_target_seconds)
        if settings.audit_lag_target_seconds > 0
        else None,
        registry_cache=RegistryCache(settings.registry_cache_seconds),
    )
    registry_cache = dispatcher.registry_cache
    REGISTRY_CACHE_HITS.set_function(lambda: registry_cache.hits if registry_cache else 0)
    REGISTRY_CACHE_MISSES.set_function(lambda: registry_cache.misses if registry_cache else 0)

    admission = dispatcher.admission
    if admission is not None:
        AUDIT_LAG.set_function(lambda: admission.lag or 0.0)
        ADMISSION_RATE.set_function(lambda: -1.0 if admission.rate is None else admission.rate)
        ADMITTED_ROWS.set_function(lambda: admission.admitted_rows)
        ADMISSION_REFUSED.set_function(lambda: admission.refused)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await dispatcher.start()
        tune_garbage_collector()
        logger.info("gateway ready", extra={"reply_channel": dispatcher.channel})
        yield
        await dispatcher.stop()
        await redis_client.aclose()

    app = FastAPI(title="modelprint gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    app.add_middleware(MetricsMiddleware)

    async def answer(
        request: Request, name: str, authorization: str | None, v2: bool
    ) -> tuple[DeployedModel, PredictReply]:
        client, model, backlog = await service.client_and_model(
            redis_client, authorization, name, dispatcher.registry_cache
        )
        body = await service.read_body(
            request.stream(), request.headers.get("content-length"), settings.max_body_bytes
        )
        rows = service.request_rows(body, model, settings.max_batch_rows, v2)
        reply = await dispatcher.predict(client, model, rows, backlog)
        ROWS.labels(model.name).inc(len(reply.label_indices))
        return model, reply

    @app.post("/v1/models/{name}/predict")
    async def predict_v1(
        name: str, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        model, reply = await answer(request, name, authorization, v2=False)
        return OrjsonResponse(
            {
                "model": model.name,
                "version": reply.version,
                "classes": reply.classes,
                "predictions": [
                    {"label": label, "probabilities": probabilities}
                    for label, probabilities in zip(
                        _labels(model, reply), reply.probabilities.tolist(), strict=True
                    )
                ],
                "request_id": reply.request_id,
            }
        )

    @app.get("/v1/models/{name}")
    async def model_info_v1(name: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        await service.authenticate(redis_client, authorization)
        model = await service.deployed_model(redis_client, name)
        return OrjsonResponse(
            {
                "model": model.name,
                "version": model.version,
                "n_features": model.n_features,
                "classes": model.classes,
            }
        )

    @app.get("/v2/health/live")
    async def live() -> Response:
        return OrjsonResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        try:
            await redis_client.ping()
            redis_ok = True
        except RedisError:
            redis_ok = False
        is_ready = redis_ok and dispatcher.healthy
        return OrjsonResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return OrjsonResponse({"name": "modelprint", "version": "0.1.0", "extensions": []})

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        await service.authenticate(redis_client, authorization)
        model = await service.deployed_model(redis_client, name)
        return OrjsonResponse(
            {
                "name": model.name,
                "versions": [str(model.version)],
                "platform": "sklearn",
                "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, model.n_features]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(model.classes)]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                ],
            }
        )

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        await service.authenticate(redis_client, authorization)
        model = await service.deployed_model(redis_client, name)
        return OrjsonResponse({"name": model.name, "ready": True})

    @app.post("/v2/models/{name}/infer")
    async def infer_v2(
        name: str, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        model, reply = await answer(request, name, authorization, v2=True)
        rows = len(reply.label_indices)
        flat_probabilities = reply.probabilities.ravel().tolist()
        return OrjsonResponse(
            {
                "model_name": model.name,
                "model_version": str(reply.version),
                "id": reply.request_id,
                "outputs": [
                    {
                        "name": "probabilities",
                        "shape": [rows, len(reply.classes)],
                        "datatype": "FP64",
                        "data": flat_probabilities,
                    },
                    {
                        "name": "label",
                        "shape": [rows],
                        "datatype": "BYTES",
                        "data": [str(label) for label in _labels(model, reply)],
                    },
                ],
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
