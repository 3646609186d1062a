"""Gateway logic: authenticate, validate, enqueue on the inference queue, await the reply asynchronously."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
import numpy as np
import orjson
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from shared.http import ApiError
from shared.names import (
    QUEUE_INFERENCE,
    REDIS_API_KEYS,
    REDIS_MODELS,
    REDIS_REPLY_CHANNEL_PREFIX,
    TASK_PREDICT,
)
from shared.schemas import ClientIdentity, DeployedModel, PredictReply
from shared.security import bearer_token, hash_api_key

logger = logging.getLogger(__name__)

_NUMBER_TYPES = (int, float)


async def authenticate(registry: aioredis.Redis, authorization: str | None) -> ClientIdentity:
    """The client owning the bearer key, or a 401."""
    api_key = bearer_token(authorization)
    if api_key is None:
        raise ApiError(
            401, "missing 'Authorization: Bearer <api key>' header", {"WWW-Authenticate": "Bearer"}
        )
    try:
        raw = await registry.hget(REDIS_API_KEYS, hash_api_key(api_key))
    except RedisError as exc:
        raise ApiError(503, "the key registry (Redis) is unavailable; retry shortly") from exc
    if raw is None:
        raise ApiError(401, "unknown or disabled API key", {"WWW-Authenticate": "Bearer"})
    return ClientIdentity.model_validate_json(raw)


async def deployed_model(registry: aioredis.Redis, name: str) -> DeployedModel:
    """The active version of a model, or a 404."""
    try:
        raw = await registry.hget(REDIS_MODELS, name)
    except RedisError as exc:
        raise ApiError(503, "the model registry (Redis) is unavailable; retry shortly") from exc
    if raw is None:
        raise ApiError(404, f"no model named {name!r} is deployed")
    return DeployedModel.model_validate_json(raw)


async def read_body(stream: Any, content_length: str | None, limit: int) -> bytes:
    """The request body, refusing (413) anything over the limit before or while reading it."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError as exc:
            raise ApiError(400, "invalid Content-Length header") from exc
        if declared > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, status: int = 400) -> Any:
    """Decode a JSON body (NaN and Infinity are not JSON and are refused)."""
    if not body:
        raise ApiError(status, "empty request body: send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            status, f"request body is not valid JSON ({exc}); NaN and Infinity are not allowed"
        ) from exc


def check_finite(array: np.ndarray, status: int) -> None:
    """Refuse rows with NaN or infinite values (e.g. 1e999), naming the first bad row."""
    finite_rows = np.isfinite(array).all(axis=1)
    if not finite_rows.all():
        bad_row = int(np.argmin(finite_rows))
        raise ApiError(status, f"row {bad_row} contains NaN or an infinite value; send finite numbers only")


def rows_to_array(instances: Any, model: DeployedModel, max_rows: int) -> np.ndarray:
    """Validate v1 `instances` (a list of equal-length rows of numbers) and return them as float64."""
    if not isinstance(instances, list):
        raise ApiError(422, "'instances' must be a list of rows, each a list of numbers")
    if not instances:
        raise ApiError(422, "'instances' is empty: send at least one row")
    if len(instances) > max_rows:
        raise ApiError(
            413, f"{len(instances)} rows exceed the limit of {max_rows} rows per request; split the batch"
        )
    for index, row in enumerate(instances):
        if not isinstance(row, list):
            raise ApiError(422, f"row {index} is not a list of numbers")
        if len(row) != model.n_features:
            raise ApiError(
                422, f"row {index} has {len(row)} features; model {model.name!r} expects {model.n_features}"
            )
        # bool is a subclass of int in Python, so compare exact types to refuse true/false.
        for value in row:
            if type(value) not in _NUMBER_TYPES:
                raise ApiError(422, f"row {index} contains {value!r}, which is not a number")
    array = np.asarray(instances, dtype=np.float64)
    check_finite(array, 422)
    return array


V2_DATATYPES = {"FP32": np.float32, "FP64": np.float64}


def v2_inputs_to_array(body: Any, model: DeployedModel, max_rows: int) -> np.ndarray:
    """Validate an Open Inference Protocol request with one FP32/FP64 tensor of shape [N, F]."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ApiError(400, "the body must be an object with an 'inputs' list (Open Inference Protocol)")
    inputs = body["inputs"]
    if len(inputs) != 1:
        raise ApiError(400, f"send exactly one input tensor; got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise ApiError(400, "each input must be an object with name, shape, datatype and data")
    datatype = tensor.get("datatype")
    if datatype not in V2_DATATYPES:
        raise ApiError(400, f"input datatype must be FP32 or FP64; got {datatype!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(dim) is int and dim >= 0 for dim in shape)
    ):
        raise ApiError(
            400, f"input shape must be [N, {model.n_features}] with non-negative integers; got {shape!r}"
        )
    rows, features = shape
    if rows == 0:
        raise ApiError(400, "input shape has 0 rows: send at least one row")
    if rows > max_rows:
        raise ApiError(413, f"{rows} rows exceed the limit of {max_rows} rows per request; split the batch")
    if features != model.n_features:
        raise ApiError(400, f"input has {features} features; model {model.name!r} expects {model.n_features}")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ApiError(400, "input 'data' must be a list of numbers (flat, row-major, or nested rows)")
    try:
        flat = np.asarray(data, dtype=object).reshape(-1)
    except ValueError as exc:
        raise ApiError(400, "input 'data' is ragged: every row must have the same length") from exc
    if flat.size != rows * features:
        raise ApiError(400, f"input 'data' holds {flat.size} values; shape {shape} needs {rows * features}")
    for value in flat:
        if type(value) not in _NUMBER_TYPES:
            raise ApiError(400, f"input 'data' contains {value!r}, which is not a number")
    # FP32 inputs are rounded to float32 first, so the fingerprint sees exactly the values the model sees.
    with np.errstate(over="ignore"):  # out-of-range FP32 values become inf and are refused below
        array = flat.astype(V2_DATATYPES[datatype]).astype(np.float64).reshape(rows, features)
    check_finite(array, 400)
    return array


class Dispatcher:
    """Sends prediction jobs to the inference queue and resolves replies from this gateway's channel."""

    def __init__(
        self, celery: Celery, redis_client: aioredis.Redis, timeout: float, max_backlog: int
    ) -> None:
        self.celery = celery
        self.redis = redis_client
        self.timeout = timeout
        self.max_backlog = max_backlog
        self.channel = REDIS_REPLY_CHANNEL_PREFIX + uuid.uuid4().hex
        self._pending: dict[str, asyncio.Future[PredictReply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe to the reply channel before any job is sent."""
        self._reader = asyncio.create_task(self._read_replies(), name="gateway-replies")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def stop(self) -> None:
        """Stop reading replies and fail whatever still waits."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ApiError(503, "the gateway is shutting down; retry"))
        self._pending.clear()

    @property
    def healthy(self) -> bool:
        return self._reader is not None and not self._reader.done() and self._subscribed.is_set()

    async def _read_replies(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._resolve(message["data"])
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except RedisError as exc:
                self._subscribed.clear()
                logger.warning("reply channel lost; resubscribing", extra={"error": str(exc)})
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(0.5)

    def _resolve(self, data: bytes) -> None:
        try:
            reply = PredictReply.model_validate_json(data)
        except ValueError:
            logger.warning("unreadable reply dropped")
            return
        future = self._pending.pop(reply.request_id, None)
        if future is not None and not future.done():
            future.set_result(reply)

    async def _check_backlog(self) -> None:
        try:
            backlog = await self.redis.llen(QUEUE_INFERENCE)
        except RedisError as exc:
            raise ApiError(503, "the job queue (Redis) is unavailable; retry shortly") from exc
        if backlog >= self.max_backlog:
            raise ApiError(
                503,
                f"the inference queue is full ({backlog} jobs waiting); retry later",
                {"Retry-After": "1"},
            )

    async def predict(self, client: ClientIdentity, model: DeployedModel, rows: np.ndarray) -> PredictReply:
        """Enqueue one job and wait for its reply, without blocking the event loop."""
        if not self._subscribed.is_set():
            raise ApiError(503, "the gateway is not connected to Redis yet; retry shortly")
        await self._check_backlog()
        request_id = uuid.uuid4().hex
        job = {
            "request_id": request_id,
            "reply_to": self.channel,
            "client_id": client.client_id,
            "model": model.name,
            "version": model.version,
            "instances": rows.tolist(),
            "received_at": datetime.now(UTC).isoformat(),
        }
        future: asyncio.Future[PredictReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            send = functools.partial(
                self.celery.send_task, TASK_PREDICT, kwargs=job, queue=QUEUE_INFERENCE, task_id=request_id
            )
            try:
                await anyio.to_thread.run_sync(send)
            except (KombuOperationalError, RedisError, OSError) as exc:
                raise ApiError(
                    503, "could not enqueue the request (Redis unavailable); retry shortly"
                ) from exc
            try:
                reply = await asyncio.wait_for(future, timeout=self.timeout)
            except TimeoutError as exc:
                raise ApiError(
                    504,
                    f"no inference worker answered within {self.timeout:g} s; the service may be overloaded "
                    "or no worker is running; retry later",
                ) from exc
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise ApiError(reply.status, reply.error or "inference failed")
        return reply
