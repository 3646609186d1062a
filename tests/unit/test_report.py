"""The HTML evidence report of a suspect scan: self-contained, escaped, with the verdict and its evidence."""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

import numpy as np
import pytest

from services.auditor.report import (
    agreement_png,
    format_p,
    null_distribution_png,
    p_value_sentence,
    render_html,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHA = "ab12" * 16
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def stolen_report() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "scan_id": 12,
        "status": "done",
        "verdict": "stolen",
        "p_value": 1.2e-9,
        "level": 0.001,
        "explanation": "The suspect's probabilities carry our watermark on the replayed queries.",
        "suspect": {
            "id": 3,
            "name": "acme-ecg",
            "url": "http://127.0.0.1:9000",
            "protocol": "v2",
            "remote_model": "ecg",
        },
        "model": {
            "name": "ecg-mlp",
            "version": 1,
            "sha256": SHA,
            "classes": ["normal_sinus_rhythm", "atrial_fibrillation"],
        },
        "fingerprint": {"scheme": "hmac-second-class", "key_id": "k1", "alpha": 0.08},
        "client": {
            "id": 7,
            "name": "thief",
            "chain_length": 1500,
            "chain_head": "9f0c" * 16,
            "chain_ok": True,
        },
        "clients_tested": [{"id": 7, "name": "thief", "replayed": 1000}],
        "probe_counts": {"control": 150, "replay": 1000, "total": 1150},
        "started_at": "2026-11-22T07:00:00+00:00",
        "finished_at": "2026-11-22T07:01:30+00:00",
        "software_version": "0.1.0",
        "tests": [
            {
                "name": "watermark_replay[client 7]",
                "applicable": True,
                "statistic": 0.41,
                "p_value": 1e-12,
                "p_value_adjusted": 4e-12,
                "p_value_empirical": 0.000999,
                "p_value_parametric": 1e-12,
                "explanation": "the watermark correlation is far above chance",
                "observed": 0.41,
                "null_samples": rng.normal(0.0, 0.03, 1000).tolist(),
                "details": {"n": 1000},
            },
            {
                "name": "reference_agreement",
                "applicable": True,
                "statistic": 0.95,
                "p_value": 0.01,
                "p_value_adjusted": 0.02,
                "p_value_empirical": 0.0476,
                "p_value_parametric": 0.01,
                "explanation": "agreement with our labels vs independent reference models",
                "observed": 0.95,
                "null_samples": rng.uniform(0.88, 0.93, 20).tolist(),
                "details": {"references": 20},
            },
            {
                "name": "output_distance",
                "applicable": False,
                "statistic": None,
                "p_value": None,
                "p_value_adjusted": None,
                "p_value_empirical": None,
                "p_value_parametric": None,
                "explanation": "the suspect returns labels only",
                "observed": None,
                "null_samples": [],
                "details": {},
            },
            {
                "name": "label_agreement_zero",
                "applicable": True,
                "statistic": 1.0,
                "p_value": 0.0,
                "p_value_adjusted": 0.0,
                "p_value_empirical": 0.000999,
                "p_value_parametric": 0.0,
                "explanation": "exact agreement",
                "observed": 1.0,
                "null_samples": [],
                "details": {},
            },
        ],
        "error": None,
    }


def failed_report() -> dict[str, Any]:
    report = stolen_report()
    report.update(
        status="failed",
        verdict=None,
        p_value=None,
        tests=[],
        client=None,
        clients_tested=[],
        probe_counts={"control": 0, "replay": 0, "total": 0},
        finished_at=None,
        error="suspect unreachable: connection refused <b>",
    )
    return report


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<html") == 1
    assert page.count("</html>") == 1
    assert "<script" not in page.lower()
    assert not re.search(r"<link\b", page, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:|//)", page, re.IGNORECASE)
    assert "@import" not in page
    # Escaped text contains no "<", so every tag found here is a real element of the page.
    for tag in re.findall(r"<[A-Za-z][^>]*>", page):
        assert not re.search(r"""\b(src|href|action|data)\s*=\s*["']?\s*(https?:|//)""", tag, re.I), tag
    for tag in re.findall(r"<img\b[^>]*>", page):
        assert 'src="data:image/png;base64,' in tag


def plotted_tests(page: str) -> list[str]:
    return re.findall(r'<figure class="plot" data-test="([^"]*)">', page)


def test_stolen_report_shows_verdict_and_evidence() -> None:
    page = render_html(stolen_report())
    assert_self_contained(page)
    assert "STOLEN" in page
    assert "#b3261e" in page  # red
    assert "p = 1.2e-09, below the family-wise level 0.001" in page
    assert SHA in page
    assert "k1" in page
    assert "hmac-second-class" in page
    assert "9f0c" * 16 in page
    assert "verified" in page
    assert "1150" in page
    assert "0.1.0" in page
    assert "Holm-Bonferroni" in page
    for name in (
        "watermark_replay[client 7]",
        "reference_agreement",
        "output_distance",
        "label_agreement_zero",
    ):
        assert f'data-test="{name}"' in page
    assert "the suspect returns labels only" in page
    assert "0.000999" in page
    assert "4e-12" in page
    assert "&lt; 1e-300" in page
    assert 'id="error"' not in page


def test_plots_are_embedded_pngs_and_only_for_applicable_tests_with_null_samples() -> None:
    page = render_html(stolen_report())
    images = IMG_RE.findall(page)
    assert len(images) == 2
    for data in images:
        assert base64.b64decode(data).startswith(PNG_SIGNATURE)
    assert plotted_tests(page) == ["watermark_replay[client 7]", "reference_agreement"]
    # reference tests with few null samples are shown as reference models, not as a histogram
    assert "reference models trained independently" in page


def test_failed_report_shows_error_box_and_no_plots() -> None:
    page = render_html(failed_report())
    assert_self_contained(page)
    assert 'id="error"' in page
    assert "suspect unreachable: connection refused &lt;b&gt;" in page
    assert "NO VERDICT" in page
    assert "no p-value was computed" in page
    assert "No test was run" in page
    assert "no client history was replayed" in page
    assert not IMG_RE.findall(page)
    assert not plotted_tests(page)


@pytest.mark.parametrize(("verdict", "colour"), [("not_stolen", "#1e7b34"), ("inconclusive", "#b26a00")])
def test_verdict_colours(verdict: str, colour: str) -> None:
    report = stolen_report()
    report.update(verdict=verdict, p_value=0.2)
    page = render_html(report)
    assert f"--vc: {colour}" in page
    assert "p = 0.2, not below the family-wise level 0.001" in page


def test_user_controlled_fields_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    report = copy.deepcopy(stolen_report())
    report["suspect"]["name"] = evil
    report["suspect"]["url"] = 'http://x/"><img src=http://evil/x.png>'
    report["explanation"] = f"summary {evil}"
    report["tests"][0]["explanation"] = f"test {evil}"
    report["tests"][1]["name"] = 'reference_agreement"><script>x()</script>'
    report["client"]["name"] = evil
    report["model"]["classes"] = [evil]
    report["tests"][0]["details"] = {"note": evil}
    page = render_html(report)
    assert_self_contained(page)
    assert evil not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=http" not in page
    assert "&lt;img src=http://evil/x.png&gt;" in page


def test_only_known_fields_are_rendered_so_a_stray_secret_does_not_leak() -> None:
    report = stolen_report()
    report["fingerprint"]["key"] = "SECRET-KEY-MATERIAL-0123"
    page = render_html(report)
    assert "SECRET-KEY-MATERIAL-0123" not in page
    assert "Fingerprint key id" in page


def test_format_p() -> None:
    assert format_p(1.2e-9) == "1.2e-09"
    assert format_p(0.000999) == "0.000999"
    assert format_p(0.0) == "< 1e-300"
    assert format_p(None) == "—"
    assert format_p(0.04567) == "0.0457"
    assert p_value_sentence(None, 0.001).startswith("no p-value")
    assert p_value_sentence(0.0, 0.001) == "p < 1e-300, below the family-wise level 0.001"


def test_plot_functions_return_png() -> None:
    png = null_distribution_png("t", [0.1, 0.2, 0.15], 0.9, 1e-5)
    assert png.startswith(PNG_SIGNATURE)
    assert null_distribution_png("empty", [], None, None).startswith(PNG_SIGNATURE)
    ref = [{"name": f"r{i}", "value": 0.9 + i / 100} for i in range(5)]
    assert agreement_png(ref, 0.99, "agreement").startswith(PNG_SIGNATURE)
    assert agreement_png([], float("nan"), "agreement").startswith(PNG_SIGNATURE)
