"""Fixtures: one real stack per test session (embedded Redis/PostgreSQL unless MODELPRINT_*_URL are set).

Tests stay isolated by creating their own clients and model names; nothing is shared between tests
except the servers and the deployed models built here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from modelprint.client import GatewayClient, OperatorClient
from modelprint.stack import Stack, StackOptions
from shared.config import Secrets, Settings, load_secrets
from shared.embedded import free_port

T = TypeVar("T")

# Small values so fault tests run in seconds: an unacknowledged message returns to its queue after
# this many seconds, and a request waits at most this long for a worker.
TEST_VISIBILITY_TIMEOUT = 5
TEST_PREDICT_TIMEOUT = 4


def side_redis_url(running_stack: RunningStack) -> str:
    """Database 15 of the stack's Redis: the services use database 0, so nothing there is consumed."""
    return (running_stack.stack.redis_url or "").rsplit("/", 1)[0] + "/15"


def _polls(timeout: float, message: str) -> Iterator[bool]:
    """The polls of a wait: False for the first, then True (wait an interval first) for each one
    begun before the deadline; past it, fail with the message."""
    deadline = time.monotonic() + timeout
    yield False
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s: {message}")
        yield True


def wait_until(condition: Callable[[], T], timeout: float, message: str, interval: float = 0.1) -> T:
    """Poll until the condition returns something truthy; fail with the message at the deadline."""
    for after_interval in _polls(timeout, message):
        if after_interval:
            time.sleep(interval)
        value = condition()
        if value:
            return value
    raise AssertionError("unreachable: _polls ends by raising")


async def async_wait_until(
    condition: Callable[[], T], timeout: float, message: str, interval: float = 0.1
) -> T:
    """`wait_until` inside a coroutine: awaits between polls, so the event loop runs meanwhile."""
    for after_interval in _polls(timeout, message):
        if after_interval:
            await asyncio.sleep(interval)
        value = condition()
        if value:
            return value
    raise AssertionError("unreachable: _polls ends by raising")


@dataclass
class DeployedTestModel:
    """A model deployed on the test stack, with the estimator to compare answers against."""

    name: str
    estimator: Any
    X: np.ndarray
    y: np.ndarray


@dataclass
class RunningStack:
    """Handles to the session's stack."""

    stack: Stack
    settings: Settings
    secrets: Secrets
    data_dir: Path

    def operator(self) -> OperatorClient:
        return OperatorClient(self.settings.auditor_url, self.secrets.admin_token)

    def new_client(self, prefix: str = "client") -> tuple[int, GatewayClient, str]:
        """A fresh client: (id, gateway client, raw api key)."""
        with self.operator() as operator:
            created = operator.create_client(f"{prefix}-{uuid.uuid4().hex[:8]}")
        return created["id"], GatewayClient(self.settings.gateway_url, created["api_key"]), created["api_key"]

    def query_count(self, client_id: int) -> int:
        with self.operator() as operator:
            return len(operator.all_queries(client_id))


@pytest.fixture(scope="session")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The whole system, started once per test session."""
    data_dir = tmp_path_factory.mktemp("modelprint-data")
    overrides = {
        "MODELPRINT_DATA_DIR": str(data_dir),
        "MODELPRINT_GATEWAY_PORT": str(free_port()),
        "MODELPRINT_AUDITOR_PORT": str(free_port()),
        "MODELPRINT_BROKER_VISIBILITY_TIMEOUT": str(TEST_VISIBILITY_TIMEOUT),
        "MODELPRINT_PREDICT_TIMEOUT_SECONDS": str(TEST_PREDICT_TIMEOUT),
        "MODELPRINT_LOG_LEVEL": "INFO",
        # Score every 50 new queries, and catch up on the rest every 5 s.
        "MODELPRINT_SUSPICION_EVERY": "50",
        "MODELPRINT_SUSPICION_BEAT_SECONDS": "5",
        # Scoring yields only to a machine over 90% busy (test_faults keeps every CPU busy), so that
        # the tests' own load rarely delays it; for at most 20 s.
        "MODELPRINT_SCORING_YIELD_ABOVE": "0.9",
        "MODELPRINT_SCORING_YIELD_MAX_SECONDS": "20",
        # Audit messages a killed worker had claimed, or whose drain task was lost, are stored within seconds.
        "MODELPRINT_AUDIT_OUTBOX_LEASE_SECONDS": "10",
        "MODELPRINT_AUDIT_OUTBOX_CHECK_SECONDS": "2",
        # Smaller drains than the default 32, so that a burst of 40 spans several transactions.
        "MODELPRINT_AUDIT_DRAIN_MESSAGES": "16",
        # Test webhooks and suspects are served on loopback, which the SSRF guard refuses unless allowed.
        "MODELPRINT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "MODELPRINT_SCAN_ALLOWED_HOSTS": "127.0.0.1",
        "MODELPRINT_SCAN_DISPATCH_SECONDS": "2",
        # A fixed fingerprint key: the statistical acceptance tests give the same p-values on every run.
        "MODELPRINT_FINGERPRINT_KEYS": json.dumps({"k1": hashlib.sha256(b"modelprint test key").hexdigest()}),
    }
    previous = {
        key: os.environ.get(key) for key in [*overrides, "MODELPRINT_REDIS_URL", "MODELPRINT_DATABASE_URL"]
    }
    os.environ.update(overrides)
    settings = Settings()
    stack = Stack(settings, StackOptions(with_beat=True))
    try:
        stack.start()
        # In-process calls of service code (tests of tasks and functions) reach the same servers.
        os.environ["MODELPRINT_REDIS_URL"] = stack.redis_url or ""
        os.environ["MODELPRINT_DATABASE_URL"] = stack.database_url or ""
        yield RunningStack(stack=stack, settings=settings, secrets=load_secrets(settings), data_dir=data_dir)
    finally:
        stack.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def small_model(running_stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> DeployedTestModel:
    """A 3-class MLP on 6 features, deployed once for the session."""
    import skops.io as sio
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(7)
    features = rng.normal(size=(600, 6))
    labels = np.array(["low", "mid", "high"])[np.digitize(features[:, 0] + 0.5 * features[:, 1], [-0.6, 0.6])]
    estimator = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=1).fit(features, labels)
    folder = tmp_path_factory.mktemp("small-model")
    model_path = folder / "small.skops"
    sio.dump(estimator, model_path)
    reference_path = folder / "reference.npz"
    np.savez(reference_path, X=features[:100], y=labels[:100])
    with running_stack.operator() as operator:
        operator.deploy_model("small-mlp", model_path, reference_path)
    return DeployedTestModel("small-mlp", estimator, features, labels)


@dataclass
class EcgDeployment:
    """The paper's ECG model, deployed with its held-out reference data."""

    name: str
    trained: Any
    classes: list[str]


@pytest.fixture(scope="session")
def ecg(running_stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> EcgDeployment:
    """The ECG MLP (64, 32) deployed once for the session as `ecg-mlp`."""
    from modelprint.training import save_model, save_reference_data, train_ecg_model

    trained = train_ecg_model()
    folder = tmp_path_factory.mktemp("ecg")
    save_model(trained.estimator, folder / "ecg.skops")
    save_reference_data(trained.X_test, trained.y_test, folder / "reference.npz")
    with running_stack.operator() as operator:
        deployed = operator.deploy_model("ecg-mlp", folder / "ecg.skops", folder / "reference.npz")
    return EcgDeployment("ecg-mlp", trained, [str(label) for label in deployed["classes"]])
