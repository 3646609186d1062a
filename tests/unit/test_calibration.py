"""`modelprint experiment calibrate --quick`: the offline calibration of the scans' output_replay null.

One ECG trial (the paper's victim and its 150-query thief), one independent model per family and a
soft-label surrogate per family, run in process (no stack; ~15 s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from modelprint.cli import CliError, build_parser, cmd_experiment
from modelprint.experiments.calibration import (
    INDEPENDENT,
    SURROGATE,
    CalibrationConfig,
    null_variants,
    output_replay_p,
    run_calibration,
    write_outputs,
)
from modelprint.experiments.common import FAMILIES
from services.auditor.scanstats import OUTPUT_REPLAY_BIAS_SD
from shared.config import Settings


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("calibration")
    results = run_calibration(CalibrationConfig.make("ecg", quick=True, progress=False))
    write_outputs(results, out)
    return results, out


def test_quick_calibration_writes_every_test(quick_run: tuple[dict[str, Any], Path]) -> None:
    results, out = quick_run
    assert {path.name for path in out.iterdir()} == {"table.md", "results.json", "pvalues.png"}
    assert (out / "pvalues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((out / "results.json").read_text())
    assert stored["trials_run"] == 1
    assert stored["fingerprint"]["scheme"] == "hmac-second-class"  # the paper's, as `experiment paper`
    tests = stored["tests"]
    # 1 trial x 1 budget (150) x (1 seed x 5 families independent + 5 soft surrogates).
    assert {t["budget"] for t in tests} == {150}
    assert sorted(t["family"] for t in tests if t["kind"] == INDEPENDENT) == sorted(FAMILIES)
    assert sorted(t["family"] for t in tests if t["kind"] == SURROGATE) == sorted(FAMILIES)
    assert len(tests) == 10
    for t in tests:
        assert len(t["null"]) == 9  # the auditor's nine reference models
        assert math.isfinite(t["observed"])
        assert 0.0 <= t["p_value"] <= 1.0
    # The paper run's thief for 150 queries (the first budget of trial 0).
    assert {t["query_seed"] for t in tests} == {5_000}
    summary = stored["summary"]
    assert summary["independent_tests"] == 5
    assert summary["surrogate_tests"] == 5
    table = (out / "table.md").read_text()
    assert f"allowance B = {OUTPUT_REPLAY_BIAS_SD:g} (the scans' null)**" in table
    assert "normal fit" in table


def test_recomputed_p_is_the_scans_p(quick_run: tuple[dict[str, Any], Path]) -> None:
    results, _ = quick_run
    for t in results["tests"]:
        recomputed = output_replay_p(t["observed"], t["null"], OUTPUT_REPLAY_BIAS_SD)
        assert recomputed == pytest.approx(t["p_value"], rel=1e-9, abs=0), t
    assert results["summary"]["recomputed_vs_scan_max_relative_difference"] <= 1e-9
    (scans,) = [v for v in results["summary"]["variants"] if v["used_by_scans"]]
    assert scans["allowance"] == OUTPUT_REPLAY_BIAS_SD


def test_independent_models_pass_and_surrogates_are_caught(quick_run: tuple[dict[str, Any], Path]) -> None:
    results, _ = quick_run
    independent = [t["p_value"] for t in results["tests"] if t["kind"] == INDEPENDENT]
    surrogates = {t["family"]: t["p_value"] for t in results["tests"] if t["kind"] == SURROGATE}
    # On this seed the smallest independent p is 0.18 and the MLP surrogate's 8.6e-7.
    assert min(independent) > 0.01, independent
    assert surrogates["mlp"] < 1e-5, surrogates
    assert sum(p < 0.001 for p in surrogates.values()) >= 1


def test_output_replay_p_by_hand() -> None:
    null = [-0.3, -0.1, 0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4]
    k, m, s = len(null), float(np.mean(null)), float(np.std(null, ddof=1))
    observed = -0.9  # below every reference contrast: the parametric tail counts
    assert output_replay_p(observed, null, None) == pytest.approx(stats.norm.cdf((observed - m) / s))
    for b in (0.0, 0.1):
        scale = math.sqrt(s * s * (1 + 1 / k) + b * b)
        assert output_replay_p(observed, null, b) == pytest.approx(stats.t.cdf((observed - m) / scale, k - 1))
    # A larger allowance never makes a low contrast more significant.
    assert output_replay_p(observed, null, 0.0) < output_replay_p(observed, null, 0.15)
    # Inside the null sample the empirical floor holds: 2 of 9 at or below -> p >= 3/10.
    assert output_replay_p(-0.1, null, None) >= 0.3
    with pytest.raises(ValueError, match="at least 3"):
        output_replay_p(0.0, [0.1, 0.2], 0.1)
    assert [v.allowance for v in null_variants()] == [0.0, 0.05, 0.1, 0.15, None]


def test_cli_calibrate_settings(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["experiment", "calibrate", "--dataset", "digits", "--quick", "--trials", "2"])
    assert (args.setting, args.dataset, args.quick, args.trials) == ("calibrate", "digits", True, 2)
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(CliError, match="ecg or digits"):
        cmd_experiment(parser.parse_args(["experiment", "calibrate", "--dataset", "breast-cancer"]), settings)
    with pytest.raises(CliError, match="without a stack"):
        cmd_experiment(parser.parse_args(["experiment", "calibrate", "--use-running"]), settings)
    with pytest.raises(ValueError, match="at least 1"):
        CalibrationConfig.make("ecg", trials=-1)
