"""Structured logging: one JSON object per line (or plain text for humans), never secrets."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record and its `extra` fields as one JSON line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _not_a_task_success(record: logging.LogRecord) -> bool:
    from celery.app.trace import LOG_SUCCESS  # noqa: PLC0415 - only workers log through it

    return record.msg is not LOG_SUCCESS


def configure_logging(service: str, level: str = "INFO", fmt: str = "json", each_task: bool = False) -> None:
    """Route all logging to stderr in the chosen format.

    Unless `each_task`, Celery's per-task INFO lines ("Task ... received", "Task ... succeeded") are
    left out; its warnings and errors, task failures and retries included, are not.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "alembic.runtime.plugins", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The strategy logs only "received" at INFO; the tracer also logs retries and ignored tasks there.
    logging.getLogger("celery.worker.strategy").setLevel(logging.NOTSET if each_task else logging.WARNING)
    trace = logging.getLogger("celery.app.trace")
    if each_task:
        trace.removeFilter(_not_a_task_success)
    else:
        trace.addFilter(_not_a_task_success)
