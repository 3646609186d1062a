"""Logging configuration: which of Celery's per-task lines are kept."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery.app.trace import LOG_RETRY, LOG_SUCCESS

from shared.logs import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    configure_logging("test", each_task=True)  # removes the filter and the level it set
    root.handlers[:], root.level = handlers, level


def _passes(logger_name: str, message: str) -> bool:
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, logging.INFO, __file__, 1, message, ({"id": "x"},), None)
    return logger.isEnabledFor(logging.INFO) and bool(logger.filter(record))


@pytest.mark.usefixtures("restore_logging")
def test_task_lines_are_left_out_unless_asked_for() -> None:
    configure_logging("test")
    assert not _passes("celery.worker.strategy", "Task %(name)s[%(id)s] received")
    assert not _passes("celery.app.trace", LOG_SUCCESS)
    assert _passes("celery.app.trace", LOG_RETRY)  # retries (e.g. PostgreSQL down) stay visible
    assert _passes("services.inference.tasks", "prediction failed")
    configure_logging("test", each_task=True)
    assert _passes("celery.worker.strategy", "Task %(name)s[%(id)s] received")
    assert _passes("celery.app.trace", LOG_SUCCESS)
