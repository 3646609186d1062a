"""`modelprint experiment attacks --quick` through the session's running stack.

Five query strategies (natural, uniform random, Jacobian augmentation, ART's KnockoffNets and
CopycatCNN driving our gateway) at 400 queries each, soft- and hard-label MLP thieves, live suspicion
and scans, and an independent model scanned against each strategy's thief. Fixed seeds and key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelprint.experiments.attack_suite import STRATEGIES, SuiteConfig, run_suite, write_outputs
from shared.fingerprint import DEFAULT_SCHEME
from tests.conftest import RunningStack

pytestmark = pytest.mark.e2e


def test_quick_attack_suite(running_stack: RunningStack, tmp_path: Path) -> None:
    # The suite runs modelprint's default scheme unless told otherwise (the session's stack uses it).
    assert SuiteConfig.make().scheme == DEFAULT_SCHEME == running_stack.settings.fingerprint_scheme
    results = run_suite(SuiteConfig.make(quick=True, progress=False), running_stack.settings)
    paths = write_outputs(results, tmp_path)
    assert {path.name for path in paths} == {"table.md", "results.json", "attacks.png"}
    assert (tmp_path / "attacks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["strategies"] == list(STRATEGIES)
    assert saved["fingerprint"]["scheme"] == DEFAULT_SCHEME
    table = (tmp_path / "table.md").read_text()
    assert f"Fingerprint: scheme `{DEFAULT_SCHEME}`" in table
    print("\n" + table)

    runs = {run["strategy"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(STRATEGIES)
    # Every strategy really went through the gateway: the auditor logged each query of each thief.
    for run in runs.values():
        assert run["sent"] == 400, run["strategy"]
        with running_stack.operator() as operator:
            stored = operator.all_queries(run["client_id"])
        assert len(stored) == 400
        assert {record["scheme"] for record in stored} == {DEFAULT_SCHEME}
        for surrogate in run["surrogates"]:
            assert surrogate["scan"]["status"] == "done", surrogate
    # Live detection: synthetic queries are flagged while extracting, natural ones look honest.
    assert runs["uniform"]["live"]["flagged_after"] is not None
    assert runs["uniform"]["live"]["flagged_after"] <= 100
    assert runs["jacobian"]["live"]["flagged_after"] is not None
    assert runs["knockoff"]["live"]["flagged_after"] is not None
    assert runs["natural"]["live"]["level"] == "none"
    # In-distribution thieves get good copies, and their surrogates are called stolen.
    natural = {s["kind"]: s for s in runs["natural"]["surrogates"]}
    assert natural["hard"]["agreement"] > 0.85
    assert [natural[kind]["scan"]["verdict"] for kind in ("soft", "hard")] == ["stolen", "stolen"]
    # The independent model is not accused, whatever odd history the suspected thief has.
    assert [r["scan"]["verdict"] for r in results["independent"]].count("stolen") == 0
    assert len(results["independent"]) == len(STRATEGIES)
