"""HTTP load for the end-to-end benchmark: `wrk` for closed loop, an asyncio generator for open loop.

Closed loop (`wrk`, Debian package): C connections each send a request, wait for its answer, send
the next; throughput is what the server sustains. A Python client (httpx) saturates itself near
300-400 requests/s on this machine, so throughput figures come from wrk, which does not.

Open loop (`open_loop`): requests are due at fixed times (rate R), sent whether or not earlier ones
were answered (a new connection is opened when all are busy), and latency is measured from the time
a request was *due*, not when it was sent, so a stalled server cannot hide its queueing delay
(coordinated omission, as wrk2 corrects). Debian's wrk has no open-loop mode, and at the rates
used here (hundreds per second) a raw-socket asyncio client keeps its schedule to within a
millisecond.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# wrk's `done` hook prints this as one JSON line on stderr; latencies in microseconds.
_WRK_SCRIPT = """
local bodies = {}
local counter = 0
local requests = {}

init = function(args)
  local index = 0
  for line in io.lines(BODIES_PATH) do
    index = index + 1
    requests[index] = wrk.format("POST", PATH, HEADERS, line)
  end
end

request = function()
  counter = counter + 1
  return requests[(counter % #requests) + 1]
end

done = function(summary, latency, requests)
  local errors = summary.errors
  io.stderr:write(string.format(
    '{"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"p50":%d,"p95":%d,"p99":%d}\\n',
    summary.requests, summary.duration, errors.status, errors.connect, errors.read, errors.write,
    errors.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    ok: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # What the errors were: an HTTP status ("503") or a failure ("timeout", "connect", ...), counted.
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Answered (2xx) requests per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Target:
    """An HTTP endpoint under test and the request bodies to send it (one JSON document per line)."""

    host: str
    port: int
    path: str
    headers: dict[str, str]
    bodies: list[bytes]


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for ASCII text


def closed_loop(target: Target, connections: int, seconds: float, timeout_s: float = 10.0) -> LoadResult:
    """`wrk -t1 -c<connections> -d<seconds>` against the target, cycling through its bodies."""
    if not wrk_available():
        raise RuntimeError("wrk is not installed: `apt-get install -y wrk` (Debian package)")
    with tempfile.TemporaryDirectory(prefix="modelprint-wrk-") as folder:
        bodies_path = Path(folder) / "bodies.txt"
        bodies_path.write_bytes(b"\n".join(target.bodies) + b"\n")
        headers = {"Content-Type": "application/json", **target.headers}
        lua_headers = (
            "{" + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()) + "}"
        )
        script = (
            f"BODIES_PATH = {_lua_string(str(bodies_path))}\nPATH = {_lua_string(target.path)}\n"
            f"HEADERS = {lua_headers}\n{_WRK_SCRIPT}"
        )
        script_path = Path(folder) / "post.lua"
        script_path.write_text(script)
        completed = subprocess.run(  # noqa: S603 - wrk from PATH with our own arguments
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds:g}s",
                f"--timeout={timeout_s:g}s",
                "-s",
                str(script_path),
                f"http://{target.host}:{target.port}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    summary = json.loads(completed.stderr.strip().splitlines()[-1])
    kinds = {"non-2xx": summary["status"]} | {
        key: summary[key] for key in ("connect", "read", "write", "timeout")
    }
    errors = sum(kinds.values())
    return LoadResult(
        ok=summary["requests"] - summary["status"],
        errors=errors,
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50"] / 1e3,
        p95_ms=summary["p95"] / 1e3,
        p99_ms=summary["p99"] / 1e3,
        error_kinds={kind: count for kind, count in kinds.items() if count},
    )


def _request_bytes(target: Target, body: bytes) -> bytes:
    headers = {
        "Host": f"{target.host}:{target.port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **target.headers,
    }
    head = f"POST {target.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length (all our servers send one); its status."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def _open_loop(target: Target, rate: float, seconds: float, timeout_s: float) -> LoadResult:
    payloads = [_request_bytes(target, body) for body in target.bodies]
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    errors = 0
    kinds: collections.Counter[str] = collections.Counter()
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(index: int, due: float) -> None:
        nonlocal errors
        connection = None
        while idle and connection is None:
            connection = idle.pop()
            if connection[0].at_eof():  # the server closed it while idle (keep-alive timeout)
                connection[1].close()
                connection = None
        try:
            if connection is None:
                connection = await asyncio.open_connection(target.host, target.port)
            reader, writer = connection
            writer.write(payloads[index % len(payloads)])
            status = await asyncio.wait_for(_read_response(reader), timeout=timeout_s)
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            errors += 1
            kinds["timeout" if isinstance(exc, TimeoutError) else type(exc).__name__] += 1
            if connection is not None:
                connection[1].close()
            return
        latencies.append(loop.time() - due)
        if 200 <= status < 300:
            idle.append(connection)
        else:
            errors += 1
            kinds[str(status)] += 1
            idle.append(connection)
            latencies.pop()

    tasks = []
    for index in range(total):
        due = start + index / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, due)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    for _, writer in idle:
        writer.close()
    if not latencies:
        return LoadResult(0, errors, elapsed, float("nan"), float("nan"), float("nan"), dict(kinds))
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return LoadResult(
        ok=len(latencies),
        errors=errors,
        seconds=elapsed,
        p50_ms=statistics.median(latencies) * 1e3,
        p95_ms=cuts[94] * 1e3,
        p99_ms=cuts[98] * 1e3,
        error_kinds=dict(kinds),
    )


def open_loop(target: Target, rate: float, seconds: float, timeout_s: float = 10.0) -> LoadResult:
    """Send `rate` requests/s for `seconds` on schedule; latency counted from each request's due time."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    began = time.perf_counter()
    # The generator's own garbage collections would count as the server's latency: a full collection
    # of this process's heap (the benchmark's model, numpy, psutil, ...) took about 110 ms, and every
    # request due meanwhile was counted late (23 of them over 20 ms at 200/s, at the same second of
    # every run). So the heap is frozen and collection is off for the run.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        result = runner(_open_loop(target, rate, seconds, timeout_s))
    finally:
        gc.enable()
        gc.unfreeze()
    if time.perf_counter() - began > seconds * 3 + timeout_s:
        raise RuntimeError("the open-loop generator fell far behind its schedule")
    return result
