"""Gateway logic: authenticate, validate, enqueue on the inference queue, await the reply asynchronously."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from services.gateway import fastjson
from services.gateway.publisher import JobPublisher
from services.gateway.registry_cache import RegistryCache
from shared.celery_app import FAST_SERIALIZER
from shared.http import ApiError
from shared.names import (
    QUEUE_INFERENCE,
    REDIS_API_KEYS,
    REDIS_AUDIT_LAG,
    REDIS_MODELS,
    REDIS_REGISTRY_CHANNEL,
    REDIS_REPLY_CHANNEL_PREFIX,
    TASK_PREDICT,
)
from shared.schemas import ClientIdentity, DeployedModel, PredictReplies, PredictReply, pack_rows
from shared.security import bearer_token, hash_api_key

logger = logging.getLogger(__name__)

# The gateway reads the audit workers' lag reports this often, and ignores reports older than this.
AUDIT_LAG_POLL_SECONDS = 0.25
AUDIT_LAG_MAX_AGE_SECONDS = 2.0

_REGISTRY_CHANNEL_BYTES = REDIS_REGISTRY_CHANNEL.encode()

_NUMBER_TYPES = (int, float)
_NUMBER_TYPE_SET = frozenset(_NUMBER_TYPES)


def _key_hash(authorization: str | None) -> str:
    api_key = bearer_token(authorization)
    if api_key is None:
        raise ApiError(
            401, "missing 'Authorization: Bearer <api key>' header", {"WWW-Authenticate": "Bearer"}
        )
    return hash_api_key(api_key)


# Registry entries are parsed once per distinct value. The gateway keeps what it read for a few seconds
# (registry_cache.py), emptied on every change, so a disabled key or a new model version takes effect at
# once.
@functools.lru_cache(maxsize=4096)
def _client_identity(raw: bytes | str) -> ClientIdentity:
    return ClientIdentity.model_validate_json(raw)


@functools.lru_cache(maxsize=1024)
def _deployed_model(raw: bytes | str) -> DeployedModel:
    return DeployedModel.model_validate_json(raw)


def _identity_or_401(raw: bytes | str | None) -> ClientIdentity:
    if raw is None:
        raise ApiError(401, "unknown or disabled API key", {"WWW-Authenticate": "Bearer"})
    return _client_identity(raw)


def _model_or_404(raw: bytes | str | None, name: str) -> DeployedModel:
    if raw is None:
        raise ApiError(404, f"no model named {name!r} is deployed")
    return _deployed_model(raw)


async def authenticate(registry: aioredis.Redis, authorization: str | None) -> ClientIdentity:
    """The client owning the bearer key, or a 401."""
    key_hash = _key_hash(authorization)
    try:
        raw = await registry.hget(REDIS_API_KEYS, key_hash)
    except RedisError as exc:
        raise ApiError(503, "the key registry (Redis) is unavailable; retry shortly") from exc
    return _identity_or_401(raw)


async def deployed_model(registry: aioredis.Redis, name: str) -> DeployedModel:
    """The active version of a model, or a 404."""
    try:
        raw = await registry.hget(REDIS_MODELS, name)
    except RedisError as exc:
        raise ApiError(503, "the model registry (Redis) is unavailable; retry shortly") from exc
    return _model_or_404(raw, name)


async def client_and_model(
    registry: aioredis.Redis, authorization: str | None, name: str, cache: RegistryCache | None = None
) -> tuple[ClientIdentity, DeployedModel, int]:
    """`authenticate` and `deployed_model` in one Redis round trip (401 before 404, as separately),
    with the inference queue's length for `Dispatcher.predict`; from `cache` when it holds all three."""
    key_hash = _key_hash(authorization)
    if cache is not None:
        cached = cache.lookup(key_hash, name)
        if cached is not None:
            return cached
        generation = cache.generation
    try:
        async with registry.pipeline(transaction=False) as pipe:
            pipe.hget(REDIS_API_KEYS, key_hash)
            pipe.hget(REDIS_MODELS, name)
            pipe.llen(QUEUE_INFERENCE)
            raw_client, raw_model, backlog = await pipe.execute()
    except RedisError as exc:
        raise ApiError(503, "the registry (Redis) is unavailable; retry shortly") from exc
    client, model = _identity_or_401(raw_client), _model_or_404(raw_model, name)
    if cache is not None:
        cache.store(generation, key_hash, client, name, model, int(backlog))
    return client, model, int(backlog)


def _first_non_number(values: list[Any]) -> Any:
    return next(value for value in values if type(value) not in _NUMBER_TYPES)


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


_BACKSLASH, _LETTER_U, _LETTER_L = ord("\\"), ord("u"), ord("l")
# The letters u and l in the text of each JSON literal: true, false, null.
_LITERAL_LETTERS = {True: (1, 0), False: (0, 1), None: (1, 2)}
_NUMPY_COUNT_FROM = 16384  # body bytes


def may_hold_literals(body: bytes, payload: Any, numbers: Any) -> bool:
    """Whether the list `numbers` (the parsed request's data) may hold a JSON true, false or null.

    numpy's type inference takes a boolean for a number (1.0 or 0.0), so the gateway may trust it only
    for data without booleans; proving that by looking at each value costs about 0.3 ms on an 80x80
    request. Instead: every `true` holds a "u", every `false` an "l", every `null` both, and numbers
    hold neither. So when the body holds exactly as many u's and l's as the rest of the parsed payload
    accounts for (its keys, its strings and its literals outside `numbers`), `numbers` holds no
    literal. That rest is small (names, shape, datatype), and counting the letters takes about 1 µs
    for a single row and 25 µs for 128 KB. A body with a backslash is not judged (an escape such as
    \u006c writes a letter the body's text does not hold), nor one without a `numbers` list: both
    answer True, and the caller checks value by value. Duplicate keys only add text the payload does
    not show, so they too can only answer True.
    """
    if not isinstance(numbers, list):
        return True
    counts = _letter_counts(body)
    if counts is None:
        return True
    expected_u = expected_l = 0
    pending = [payload]
    while pending:
        item = pending.pop()
        if item is numbers:
            continue
        if isinstance(item, dict):
            for key, value in item.items():
                expected_u += key.count("u")
                expected_l += key.count("l")
                pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            expected_u += item.count("u")
            expected_l += item.count("l")
        elif item is None or isinstance(item, bool):
            letters = _LITERAL_LETTERS[item]
            expected_u += letters[0]
            expected_l += letters[1]
    return counts != (expected_u, expected_l)


def _letter_counts(body: bytes) -> tuple[int, int] | None:
    """The numbers of u's and l's in `body`, or None when it holds a backslash.

    bytes.count is quicker for small bodies (1.3 against 6 µs for a single row), numpy for large ones
    (25 against 74 µs for 80x80).
    """
    if len(body) < _NUMPY_COUNT_FROM:
        if b"\\" in body:
            return None
        return body.count(b"u"), body.count(b"l")
    text = np.frombuffer(body, dtype=np.uint8)
    if np.any(text == _BACKSLASH):
        return None
    return int(np.count_nonzero(text == _LETTER_U)), int(np.count_nonzero(text == _LETTER_L))


def check_finite(array: np.ndarray, status: int) -> None:
    """Refuse rows with NaN or infinite values (e.g. 1e999), naming the first bad row."""
    finite_rows = np.isfinite(array).all(axis=1)
    if not finite_rows.all():
        bad_row = int(np.argmin(finite_rows))
        raise ApiError(status, f"row {bad_row} contains NaN or an infinite value; send finite numbers only")


def _numbers_only(values: list[Any]) -> np.ndarray | None:
    """The values as an array if numpy infers a number dtype for them (None: look closer).

    Without JSON booleans, which numpy would read as numbers, anything else in the lists (a string,
    a null, an object, a ragged or nested row) gives another dtype or fails.
    """
    try:
        inferred = np.array(values)
    except ValueError:  # ragged
        return None
    return inferred if inferred.dtype.kind in "fiu" else None


def rows_to_array(
    instances: Any, model: DeployedModel, max_rows: int, may_hold_booleans: bool = True
) -> np.ndarray:
    """Validate v1 `instances` (a list of equal-length rows of numbers) and return them as float64.

    `may_hold_booleans` is False when `instances` hold no `true` or `false` (`may_hold_literals`):
    then numpy's type inference alone tells numbers from anything else, since a string, a null, an
    object, or a ragged or nested row each gives another dtype or shape; the row-by-row check (about
    30 ns a value, 0.2 ms for 80 rows of 80) then runs only to name the problem. A boolean among
    numbers would pass numpy as 1.0 or 0.0, hence the flag. `instances` may also be the 2-D float64
    array `fastjson.numbers_payload` made of equal-length rows of numbers.
    """
    from_fastjson = isinstance(instances, np.ndarray)
    if not (from_fastjson or isinstance(instances, list)):
        raise ApiError(422, "'instances' must be a list of rows, each a list of numbers")
    if not len(instances):
        raise ApiError(422, "'instances' is empty: send at least one row")
    if len(instances) > max_rows:
        raise ApiError(
            413, f"{len(instances)} rows exceed the limit of {max_rows} rows per request; split the batch"
        )
    if from_fastjson:
        if instances.shape[1] != model.n_features:
            raise _row_length_error(0, instances.shape[1], model)
        check_finite(instances, 422)
        return instances
    if not may_hold_booleans:
        inferred = _numbers_only(instances)
        if inferred is not None and inferred.shape == (len(instances), model.n_features):
            array = inferred.astype(np.float64, copy=False)
            check_finite(array, 422)
            return array
    for index, row in enumerate(instances):
        if not isinstance(row, list):
            raise ApiError(422, f"row {index} is not a list of numbers")
        if len(row) != model.n_features:
            raise _row_length_error(index, len(row), model)
        # bool is a subclass of int in Python, so compare exact types to refuse true/false.
        if not set(map(type, row)) <= _NUMBER_TYPE_SET:
            raise ApiError(422, f"row {index} contains {_first_non_number(row)!r}, which is not a number")
    array = np.asarray(instances, dtype=np.float64)
    check_finite(array, 422)
    return array


def _row_length_error(index: int, length: int, model: DeployedModel) -> ApiError:
    expected = model.n_features
    return ApiError(422, f"row {index} has {length} features; model {model.name!r} expects {expected}")


V2_DATATYPES = {"FP32": np.float32, "FP64": np.float64}


def v2_data(body: Any) -> Any:
    """The data list of an Open Inference Protocol request's single input, if it is shaped so."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict):
        return inputs[0].get("data")
    return None


def v2_inputs_to_array(
    body: Any, model: DeployedModel, max_rows: int, may_hold_booleans: bool = True
) -> np.ndarray:
    """Validate an Open Inference Protocol request with one FP32/FP64 tensor of shape [N, F].

    `may_hold_booleans` as for `rows_to_array`; `data` may also be the float64 array (flat, or 2-D
    for rows) `fastjson.numbers_payload` made of it.
    """
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
    if isinstance(data, np.ndarray):
        if data.size != rows * features:
            raise _v2_size_error(data.size, shape, rows * features)
        return _v2_array(data.reshape(-1), datatype, rows, features)
    if not isinstance(data, list):
        raise ApiError(400, "input 'data' must be a list of numbers (flat, row-major, or nested rows)")
    if not may_hold_booleans:
        inferred = _numbers_only(data)
        if inferred is not None and inferred.size == rows * features:
            # Integers through float64 first, as Python ints are converted in the check below.
            return _v2_array(inferred.reshape(-1).astype(np.float64, copy=False), datatype, rows, features)
    try:
        flat = np.asarray(data, dtype=object).reshape(-1)
    except ValueError:
        flat = None
    # numpy keeps the lists of uneven nesting as objects rather than failing.
    if flat is None or any(type(value) is list for value in flat):
        raise ApiError(400, "input 'data' is ragged: every row must have the same length")
    if flat.size != rows * features:
        raise _v2_size_error(flat.size, shape, rows * features)
    values = flat.tolist()
    if not set(map(type, values)) <= _NUMBER_TYPE_SET:
        raise ApiError(400, f"input 'data' contains {_first_non_number(values)!r}, which is not a number")
    return _v2_array(flat, datatype, rows, features)


def _v2_size_error(size: int, shape: list[int], needed: int) -> ApiError:
    return ApiError(400, f"input 'data' holds {size} values; shape {shape} needs {needed}")


def _v2_array(flat: np.ndarray, datatype: str, rows: int, features: int) -> np.ndarray:
    # FP32 inputs are rounded to float32 first, so the fingerprint sees exactly the values the model sees.
    with np.errstate(over="ignore"):  # out-of-range FP32 values become inf and are refused below
        array = flat.astype(V2_DATATYPES[datatype]).astype(np.float64).reshape(rows, features)
    check_finite(array, 400)
    return array


def request_rows(body: bytes, model: DeployedModel, max_rows: int, v2: bool) -> np.ndarray:
    """A prediction request's body parsed and validated into float64 rows (an `ApiError` otherwise).

    v2: an Open Inference Protocol body; otherwise v1's `{"instances": [[...], ...]}`. A well-formed
    body takes simdjson's route (`fastjson`: the numbers go to an array without a Python object each);
    any other is parsed by orjson and its numbers checked by numpy's inference or value by value, which
    also names what is wrong. Both routes give the same rows and the same errors.
    """
    payload = fastjson.numbers_payload(body, v2) if body else None
    from_fastjson = payload is not None
    if payload is None:
        payload = parse_json(body)
    if v2:
        may_hold_booleans = not from_fastjson and may_hold_literals(body, payload, v2_data(payload))
        return v2_inputs_to_array(payload, model, max_rows, may_hold_booleans=may_hold_booleans)
    if not isinstance(payload, dict) or "instances" not in payload:
        raise ApiError(422, 'the body must be an object {"instances": [[number, ...], ...]}')
    instances = payload["instances"]
    may_hold_booleans = not from_fastjson and may_hold_literals(body, payload, instances)
    return rows_to_array(instances, model, max_rows, may_hold_booleans=may_hold_booleans)


def audit_lag(reports: Mapping[Any, bytes | str], now: float, max_age: float) -> float | None:
    """The largest lag among the audit workers' reports of the last `max_age` seconds (None: none).

    A report is "<lag seconds> <unix time>" (see `REDIS_AUDIT_LAG`). A worker that is behind stores
    continuously and so reports continuously; no recent report means every worker is idle (caught up)
    or down. Unreadable reports are ignored.
    """
    recent = []
    for value in reports.values():
        try:
            lag_text, at_text = (value.decode() if isinstance(value, bytes) else value).split()
            lag, at = float(lag_text), float(at_text)
        except ValueError:
            continue
        if now - at <= max_age and lag == lag:  # lag == lag: not NaN
            recent.append(lag)
    return max(recent, default=None)


class AdmissionControl:
    """Paces the gateway's intake when the audit trail falls behind (rows per second, AIMD).

    Every answered row must reach PostgreSQL soon; when the auditor cannot keep up (the machine is
    saturated, or the audit workers are too few), answering faster only lets the audit trail fall
    further behind. So, from the lag the audit workers report, the gateway sets a rate of rows it
    admits:

    - lag above `target`: the rate drops to `decrease` times the rows per second admitted lately (at
      most once per `decrease_interval`: the lag answers a change only after the queue has moved);
    - lag at or below the target: the rate grows by `increase` per observation; it is lifted once the
      lag is below half the target, once the rate is far above what arrives, or as soon as no worker
      reports (all caught up, or down: a stopped auditor does not stop predictions; their rows wait in
      Redis). Without the half-target rule a rate cut to the floor while a backlog drained (nothing
      arriving, so "what was let in lately" is nothing) took many seconds to grow back, and the next
      light load waited for ticks: 100 single-row requests/s had a p50 of 105 ms.

    While paced, requests wait and are let in together every `tick` seconds, as many as the rate
    allows, so that they still leave as one inference job and one audit message: letting them in one
    by one made audit messages of a single request, which cost the auditor more per row and so made
    it fall further behind. A request that cannot be let in before its deadline gets a 503 with
    Retry-After.
    """

    def __init__(
        self,
        target: float,
        *,
        decrease: float = 0.7,
        increase: float = 1.05,
        decrease_interval: float = 1.0,
        tick: float = 0.1,
        min_rate: float = 100.0,
    ) -> None:
        self.target = target
        self.decrease = decrease
        self.increase = increase
        self.decrease_interval = decrease_interval
        self.tick = tick
        self.min_rate = min_rate
        self.rate: float | None = None
        self.lag: float | None = None
        self.refused = 0
        self.admitted_rows = 0
        self._budget = 0.0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._last_decrease = -math.inf
        self._last_observation: tuple[float, int] | None = None
        self._recent_rate = 0.0

    async def admit(self, rows: int, timeout: float) -> None:
        """Return once the request's rows are let in; wait (up to `timeout` s) while intake is paced."""
        if self.rate is None and not self._waiting:
            self.admitted_rows += rows
            return
        entry = (rows, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), timeout)
        except TimeoutError as exc:
            if entry[1].done():  # let in at the last moment
                return
            self._waiting.remove(entry)
            self.refused += 1
            behind = f"{self.lag:.1f} s" if self.lag is not None else "too far"
            raise ApiError(
                503,
                f"the audit trail is {behind} behind, so the gateway is pacing requests until it catches "
                "up; retry shortly",
                {"Retry-After": "1"},
            ) from exc

    def release_due(self) -> None:
        """Let in the waiting requests the rate allows now (all of them when intake is not paced)."""
        if self.rate is not None:
            self._budget = min(self._budget + self.rate * self.tick, self.rate * self.tick)
        while self._waiting and (self.rate is None or self._budget > 0):
            rows, future = self._waiting.popleft()
            self._budget -= rows  # a request larger than one tick's share goes first and is paid off later
            self.admitted_rows += rows
            future.set_result(None)

    def abandon(self, error: ApiError) -> None:
        """Fail every waiting request (the gateway is stopping)."""
        while self._waiting:
            _, future = self._waiting.popleft()
            future.set_exception(error)

    def observe(self, lag: float | None, now: float) -> None:
        """Adjust the rate to the latest audit lag (None: no recent report)."""
        self.lag = lag
        if self._last_observation is not None and now > self._last_observation[0]:
            then, admitted_then = self._last_observation
            self._recent_rate = (self.admitted_rows - admitted_then) / (now - then)
        self._last_observation = (now, self.admitted_rows)
        if lag is not None and lag > self.target:
            if now - self._last_decrease >= self.decrease_interval:
                if self.rate is None:
                    logger.warning(
                        "audit trail behind: pacing the gateway's intake",
                        extra={"audit_lag_seconds": lag, "target_seconds": self.target},
                    )
                    self._budget = 0.0
                current = self._recent_rate if self.rate is None else min(self.rate, self._recent_rate)
                self.rate = max(self.min_rate, self.decrease * current)
                self._last_decrease = now
            return
        if self.rate is None:
            return
        self.rate *= self.increase
        if lag is None or lag < self.target / 2 or self.rate > 4 * self._recent_rate + 10 * self.min_rate:
            self.rate = None
            logger.info("audit trail caught up: intake no longer paced", extra={"audit_lag_seconds": lag})
            self.release_due()


@dataclass
class _OpenJob:
    """Requests for one model version waiting to leave together as one inference task."""

    model: DeployedModel
    requests: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Dispatcher:
    """Coalesces concurrent requests into inference jobs and resolves replies from this gateway's channel.

    A request joins the open job of its model version; the job is sent `window` seconds after its
    first request arrived, or at once when it holds `max_job_rows` rows. Under load many requests
    share one task, one audit message and one reply.

    With `send_lone`, a request that finds no open job, none of the gateway's jobs awaiting its
    reply, and the gateway's last job carrying a single request, is sent at once: nothing is being
    coalesced (one request per job already) and the workers are idle, so the window would most likely
    hold it alone and only delay it (a single connection's request spent 2 of its 5.3 ms so). Under
    load jobs are in flight or carry several requests, and the window batches as before. Not while
    admission control paces the intake: paced requests are let in together and must leave together.
    A request that finds fewer than `eager_jobs` of this gateway's jobs awaiting their replies is
    also sent at once (off by default: at 16 connections it made jobs smaller, since replies arrive
    in bursts and the first request of each burst left alone).
    """

    def __init__(
        self,
        celery: Celery,
        redis_client: aioredis.Redis,
        timeout: float,
        max_backlog: int,
        window: float = 0.0,
        max_job_rows: int = 1024,
        admission: AdmissionControl | None = None,
        eager_jobs: int = 0,
        send_lone: bool = False,
        registry_cache: RegistryCache | None = None,
    ) -> None:
        # Jobs go out as Celery task messages, pushed with this asyncio client (publisher.py).
        self.publisher = JobPublisher(celery, redis_client, QUEUE_INFERENCE, FAST_SERIALIZER)
        self.admission = admission
        # Emptied on every registry change announced on the reply connection (registry_cache.py).
        self.registry_cache = registry_cache
        self.redis = redis_client
        self.timeout = timeout
        self.max_backlog = max_backlog
        self.window = window
        self.max_job_rows = max_job_rows
        self.eager_jobs = eager_jobs
        self.send_lone = send_lone
        # How many requests the gateway's last job carried (1 before the first: a first request is lone).
        self._last_job_requests = 1
        self.channel = REDIS_REPLY_CHANNEL_PREFIX + uuid.uuid4().hex
        self._channel_bytes = self.channel.encode()
        self.jobs_sent = 0
        self._pending: dict[str, asyncio.Future[PredictReply]] = {}
        self._open_jobs: dict[tuple[str, int], _OpenJob] = {}
        # Sent jobs whose requests still await a reply (by job id: how many), and each request's job.
        self._in_flight: dict[str, int] = {}
        self._job_of: dict[str, str] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._lag_watcher: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe to the reply channel before any job is sent; follow the audit lag."""
        self._reader = asyncio.create_task(self._read_replies(), name="gateway-replies")
        if self.admission is not None:
            self._lag_watcher = asyncio.create_task(self._watch_audit_lag(self.admission), name="audit-lag")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def stop(self) -> None:
        """Stop reading replies and fail whatever still waits."""
        for task in (self._reader, self._lag_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        stopping = ApiError(503, "the gateway is shutting down; retry")
        if self.admission is not None:
            self.admission.abandon(stopping)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(stopping)
        self._pending.clear()

    @property
    def healthy(self) -> bool:
        return self._reader is not None and not self._reader.done() and self._subscribed.is_set()

    async def _read_replies(self) -> None:
        """Resolve replies from this gateway's channel; follow registry changes on the same connection."""
        cache = self.registry_cache
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel, REDIS_REGISTRY_CHANNEL)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = message["channel"]
                    if message["type"] == "message":
                        if channel == self._channel_bytes:
                            self._resolve(message["data"])
                        elif cache is not None:
                            cache.invalidate()
                    elif message["type"] == "subscribe" and channel == _REGISTRY_CHANNEL_BYTES:
                        # From here on Redis sends this connection every registry change.
                        if cache is not None:
                            cache.activate()
            except asyncio.CancelledError:
                if cache is not None:
                    cache.deactivate()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except RedisError as exc:
                self._subscribed.clear()
                if cache is not None:
                    cache.deactivate()  # changes may go unseen until the subscription is back
                logger.warning("reply channel lost; resubscribing", extra={"error": str(exc)})
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(0.5)

    async def _watch_audit_lag(self, admission: AdmissionControl) -> None:
        next_poll = 0.0
        while True:
            now = time.time()
            if now >= next_poll:
                try:
                    reports = await self.redis.hgetall(REDIS_AUDIT_LAG)
                except RedisError:
                    reports = {}  # Redis is down: requests fail at enqueue anyway; do not hold them here
                now = time.time()
                admission.observe(audit_lag(reports, now, AUDIT_LAG_MAX_AGE_SECONDS), now)
                next_poll = now + AUDIT_LAG_POLL_SECONDS
            admission.release_due()
            await asyncio.sleep(admission.tick)

    def _resolve(self, data: bytes) -> None:
        try:
            replies = PredictReplies.from_message(data).replies
        except ValueError:
            logger.warning("unreadable reply dropped")
            return
        for reply in replies:
            future = self._pending.pop(reply.request_id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def _refuse_if_full(self, backlog: int) -> None:
        if backlog >= self.max_backlog:
            raise ApiError(
                503,
                f"the inference queue is full ({backlog} jobs waiting); retry later",
                {"Retry-After": "1"},
            )

    async def predict(
        self, client: ClientIdentity, model: DeployedModel, rows: np.ndarray, backlog: int
    ) -> PredictReply:
        """Add the rows to the model's open job and wait for their reply, without blocking the event loop.

        Refused (503) while the inference queue holds `max_backlog` jobs: `backlog` is its length, as
        the caller read it with the API key (`client_and_model`), which saves a round trip per job.
        """
        if not self._subscribed.is_set():
            raise ApiError(503, "the gateway is not connected to Redis yet; retry shortly")
        self._refuse_if_full(backlog)
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        lone = self.send_lone and not self._in_flight and self._last_job_requests == 1
        deadline = arrived + self.timeout
        if self.admission is not None:
            if self.admission.rate is not None:
                lone = False
            await self.admission.admit(len(rows), self.timeout)
        request_id = uuid.uuid4().hex
        future: asyncio.Future[PredictReply] = loop.create_future()
        self._pending[request_id] = future
        try:
            self._add_to_job(
                model,
                {
                    "request_id": request_id,
                    "client_id": client.client_id,
                    "instances": pack_rows(rows),
                    "received_at": datetime.now(UTC).isoformat(),
                },
                len(rows),
                lone,
            )
            try:
                reply = await asyncio.wait_for(future, timeout=max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                raise ApiError(
                    504,
                    f"no inference worker answered within {self.timeout:g} s; the service may be overloaded "
                    "or no worker is running; retry later",
                ) from exc
        finally:
            self._pending.pop(request_id, None)
            self._settle(request_id)
        if not reply.ok:
            raise ApiError(reply.status, reply.error or "inference failed")
        return reply

    def _add_to_job(
        self, model: DeployedModel, request: dict[str, Any], rows: int, lone: bool = False
    ) -> None:
        key = (model.name, model.version)
        job = self._open_jobs.get(key)
        if job is not None and job.rows + rows > self.max_job_rows:
            self._send_job(key, job)
            job = None
        eager = False
        if job is None:
            job = self._open_jobs[key] = _OpenJob(model)
            eager = lone or len(self._in_flight) < self.eager_jobs
            if not eager:
                asyncio.get_running_loop().call_later(self.window, self._send_job, key, job)
        job.requests.append(request)
        job.rows += rows
        if eager or job.rows >= self.max_job_rows:
            self._send_job(key, job)

    @property
    def jobs_in_flight(self) -> int:
        """Sent jobs with a request still awaiting its reply."""
        return len(self._in_flight)

    def _settle(self, request_id: str) -> None:
        """A request is answered, failed or timed out: its job is in flight until all of them are."""
        job_id = self._job_of.pop(request_id, None)
        if job_id is None:
            return
        left = self._in_flight[job_id] - 1
        if left:
            self._in_flight[job_id] = left
        else:
            del self._in_flight[job_id]

    def _send_job(self, key: tuple[str, int], job: _OpenJob) -> None:
        if self._open_jobs.get(key) is not job:
            return  # already sent (full before its window ended)
        del self._open_jobs[key]
        self._in_flight[job.job_id] = self._last_job_requests = len(job.requests)
        for request in job.requests:
            self._job_of[request["request_id"]] = job.job_id
        task = asyncio.create_task(self._send(job))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _fail(self, job: _OpenJob, error: ApiError) -> None:
        for request in job.requests:
            future = self._pending.get(request["request_id"])
            if future is not None and not future.done():
                future.set_exception(error)

    async def _send(self, job: _OpenJob) -> None:
        job_id = job.job_id
        payload = {
            "job_id": job_id,
            "reply_to": self.channel,
            "model": job.model.name,
            "version": job.model.version,
            "requests": job.requests,
        }
        try:
            message = self.publisher.message(
                TASK_PREDICT,
                job_id,
                payload,
                # Each of the job's requests gives up (504) by then: a job still queued, or back in
                # the queue after its worker died, is discarded unanswered rather than run for nobody.
                expires=self.timeout,
                argsrepr="()",
                # Not Celery's repr of the rows: CPU spent for nothing, and clients' inputs in
                # whatever shows task arguments.
                kwargsrepr=f"{{job {job_id}: {len(job.requests)} requests, {job.rows} rows}}",
            )
            queued = await self.publisher.publish(message)
        except (RedisError, OSError) as exc:
            logger.warning("could not enqueue a job", extra={"error": str(exc)})
            self._fail(job, ApiError(503, "could not enqueue the request (Redis unavailable); retry shortly"))
        else:
            self.jobs_sent += 1
            if self.registry_cache is not None:
                self.registry_cache.observe_backlog(queued - 1)  # waiting besides this job
