"""Acceptance of live extraction detection, through the real stack with fixed seeds.

10 honest clients send 2,000 natural ECG queries each and raise no alert; clients running three
extraction strategies are flagged within 500 queries each. The query count at which each attacker
was flagged is printed (run with -s to see it) and recorded in the README.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelprint.attacks import (
    JacobianAugmentation,
    ecg_sampler,
    natural_queries,
    perturbation_pair_queries,
    uniform_random_queries,
)
from modelprint.client import GatewayClient
from shared.priority import autogroup_nice
from tests.conftest import EcgDeployment, RunningStack, wait_until

pytestmark = pytest.mark.e2e

MODEL = "ecg-mlp"
CHUNK = 50
ATTACK_BUDGET = 500


def _suspicion(running_stack: RunningStack, client_id: int) -> dict[str, object]:
    with running_stack.operator() as operator:
        return operator.suspicion(client_id)  # type: ignore[no-any-return]


def _scored_up_to(running_stack: RunningStack, client_id: int, sent: int) -> dict[str, object] | None:
    report = _suspicion(running_stack, client_id)
    results = report["models"].get(MODEL, [])  # type: ignore[attr-defined]
    if results and all(result["queries_seen"] >= sent for result in results):
        return report
    return None


def _send(gateway: GatewayClient, rows: np.ndarray) -> np.ndarray:
    answer = gateway.predict(MODEL, rows.tolist())
    return np.array([prediction["label"] for prediction in answer["predictions"]])


def _open_alerts_for(running_stack: RunningStack, client_ids: set[int]) -> list[dict[str, object]]:
    with running_stack.operator() as operator:
        alerts = operator.list_alerts(status="open")
    wanted = {("client", str(client_id)) for client_id in client_ids}
    return [
        alert
        for alert in alerts
        if (alert["subject"]["type"], alert["subject"]["id"]) in wanted
        and alert["kind"] == "extraction_suspected"
    ]


def test_honest_clients_raise_no_alert(running_stack: RunningStack, ecg: EcgDeployment) -> None:
    honest: list[int] = []
    for index in range(10):
        client_id, gateway, _ = running_stack.new_client(f"honest-{index}")
        sampler = ecg_sampler(np.random.default_rng(1000 + index))
        with gateway:
            for _ in range(2000 // 100):
                _send(gateway, natural_queries(sampler, 100))
        honest.append(client_id)
    for client_id in honest:
        report = wait_until(
            lambda client_id=client_id: _scored_up_to(running_stack, client_id, 2000),
            120,
            f"client {client_id}'s 2,000 queries to be scored",
            0.5,
        )
        assert report["level"] == "none", report
    assert _open_alerts_for(running_stack, set(honest)) == []


def _flagged_at(
    running_stack: RunningStack, name: str, next_rows: Callable[[int, GatewayClient], np.ndarray]
) -> tuple[int | None, dict[str, object]]:
    """Send an attack in chunks; return the query count at which the client was first flagged."""
    client_id, gateway, _ = running_stack.new_client(name)
    sent = 0
    report: dict[str, object] = {}
    with gateway:
        while sent < ATTACK_BUDGET:
            sent += len(next_rows(sent, gateway))
            report = wait_until(
                lambda sent=sent: _scored_up_to(running_stack, client_id, sent),
                60,
                f"{name}: {sent} queries scored",
                0.2,
            )
            if report["level"] != "none":
                alerts = wait_until(
                    lambda: _open_alerts_for(running_stack, {client_id}), 30, f"an alert for {name}", 0.2
                )
                assert alerts[0]["severity"] in ("warning", "critical")
                return sent, report
    return None, report


def test_extraction_strategies_are_flagged_within_500_queries(
    running_stack: RunningStack, ecg: EcgDeployment
) -> None:
    reference = ecg.trained.X_test
    rng = np.random.default_rng(2026)

    uniform = uniform_random_queries(reference, ATTACK_BUDGET, rng)
    natural = natural_queries(ecg_sampler(np.random.default_rng(77)), ATTACK_BUDGET)
    pairs = perturbation_pair_queries(
        natural, ATTACK_BUDGET, rng, scale=0.05, feature_std=reference.std(axis=0)
    )

    def label_index(labels: np.ndarray) -> np.ndarray:
        return np.array([ecg.classes.index(str(label)) for label in labels])

    jbda_holder: dict[str, JacobianAugmentation] = {}

    def jbda_rows(sent: int, gateway: GatewayClient) -> np.ndarray:
        attack = jbda_holder.get("attack")
        if attack is None:
            seeds = natural_queries(ecg_sampler(np.random.default_rng(99)), 10)
            attack = jbda_holder["attack"] = JacobianAugmentation(
                seeds,
                oracle=lambda rows: label_index(_send(gateway, rows)),
                rng=rng,
                step=0.1,
                feature_scale=reference.std(axis=0),
            )
        batch = attack.next_batch(min(CHUNK, ATTACK_BUDGET - sent))
        attack.observe(batch, label_index(_send(gateway, batch)))
        return batch

    strategies: dict[str, Callable[[int, GatewayClient], np.ndarray]] = {
        "uniform-random": lambda sent, gateway: _send(gateway, uniform[sent : sent + CHUNK]),
        "perturbation-pairs": lambda sent, gateway: _send(gateway, pairs[sent : sent + CHUNK]),
        "jacobian-augmentation": jbda_rows,
    }
    flagged: dict[str, int | None] = {}
    for name, next_rows in strategies.items():
        flagged[name], report = _flagged_at(running_stack, f"thief-{name}", next_rows)
        alarms = [r["detector"] for r in report["models"][MODEL] if r["alarm"]]  # type: ignore[index]
        print(f"{name}: flagged after {flagged[name]} queries by {alarms}")
    assert all(count is not None and count <= ATTACK_BUDGET for count in flagged.values()), flagged


def test_the_scoring_worker_yields_the_cpu_to_serving_and_storing(running_stack: RunningStack) -> None:
    """`modelprint up` runs the scoring worker at nice 10 in a scheduling group of its own at nice 10
    (shared/priority.py: a process nice alone does not weigh against the other services' sessions),
    and the services that answer and store queries at the default priority."""

    def priority(pid: int) -> tuple[int, int | None]:
        group = Path(f"/proc/{pid}/autogroup")
        return os.getpriority(os.PRIO_PROCESS, pid), autogroup_nice(
            group.read_text()
        ) if group.exists() else None

    processes = {service.name: service.process for service in running_stack.stack.services}
    scoring = processes["scoring-worker"]
    assert scoring is not None
    nice, group = priority(scoring.pid)
    assert nice == 10
    assert group in (None, 10), group
    for name in ("gateway", "inference-worker-1", "audit-worker"):
        process = processes[name]
        assert process is not None
        nice, group = priority(process.pid)
        assert nice == 0, name
        assert group in (None, 0), (name, group)
