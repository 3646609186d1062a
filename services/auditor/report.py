"""Self-contained HTML evidence report for a suspect scan.

A suspect scan produces a JSON-serialisable report dict (see ``render_html`` for the fields read).
This module turns it into one HTML file an outside expert can read offline: inline CSS, plots embedded
as base64 PNG ``<img>`` elements, no scripts and no external resources (a Content-Security-Policy meta
tag forbids them as well). Every value taken from the report is HTML-escaped, since suspect names, URLs
and messages are user-controlled. The report carries a fingerprint key *id*, never a key.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

VERDICT_COLOURS = {"stolen": "#b3261e", "not_stolen": "#1e7b34", "inconclusive": "#b26a00"}
VERDICT_TITLES = {"stolen": "STOLEN", "not_stolen": "NOT STOLEN", "inconclusive": "INCONCLUSIVE"}
VERDICT_LEADS = {
    "stolen": (
        "At least one test rejected, at the family-wise level, the hypothesis that the suspect model was "
        "trained independently of our API."
    ),
    "not_stolen": (
        "No test rejected the hypothesis that the suspect model was trained independently of our API."
    ),
    "inconclusive": "The scan could not reach a decision either way; see the explanation and the tests.",
}
NO_VERDICT_COLOUR = "#5f6368"
# Tests whose null samples are the values of independently trained reference models.
REFERENCE_TEST_PREFIXES = ("reference_agreement", "output_distance")
# Below this many null samples, reference tests are drawn as one point per reference model.
STRIP_PLOT_MAX_REFERENCES = 30
FIGURE_SIZE_INCHES = (6.0, 3.0)
FIGURE_DPI = 100

DECISION_TEXT = (
    "Each test below gives a p-value under the null hypothesis that the suspect model was trained "
    "independently of our API, i.e. without using its answers: the probability of seeing a result at "
    "least as extreme as the suspect's if that hypothesis were true. The empirical p-value compares the "
    "suspect's statistic with simulated null samples (with n samples it can be no smaller than about "
    "1/(n+1)); the parametric p-value comes from an analytic approximation of the same null distribution. "
    "Because several hypotheses are tested, the p-values are adjusted for multiple testing with the "
    "Holm-Bonferroni method, which keeps the probability of any false accusation across all tests (the "
    "family-wise error rate) at or below the level. The verdict is <strong>stolen</strong> only when an "
    "adjusted p-value is below the level. A test's own p-value is the larger of its empirical and "
    "parametric ones, except that the parametric one alone is used when the suspect lies beyond every null "
    "sample (where the empirical one cannot go lower). The label-replay test's is the larger of two: "
    "against independent models, and against a model trained on the very queries the client sent, with "
    "their true labels (such a model fits those queries too, but not our answers)."
)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #202124;
       max-width: 980px; margin: 0 auto; padding: 24px; line-height: 1.45; }
h1 { font-size: 1.5em; margin: 0 0 4px 0; }
h2 { font-size: 1.2em; border-bottom: 1px solid #dadce0; padding-bottom: 4px; margin-top: 32px; }
header.verdict { border-left: 10px solid var(--vc); background: #f8f9fa; padding: 16px 20px; }
.verdict-badge { display: inline-block; background: var(--vc); color: #fff; font-weight: 700;
                 font-size: 1.6em; letter-spacing: 0.06em; padding: 4px 14px; border-radius: 4px; }
.pline { font-size: 1.15em; margin: 10px 0 4px 0; }
.muted { color: #5f6368; font-size: 0.9em; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { border: 1px solid #dadce0; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f4; }
table.kv th { width: 30%; }
td.num { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
.mono { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
tr.na td { color: #80868b; }
tr.significant td.padj { font-weight: 700; color: #b3261e; }
.ok { color: #1e7b34; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.error { border: 2px solid #b3261e; background: #fce8e6; padding: 12px 16px; margin-top: 24px; }
.error pre { white-space: pre-wrap; word-break: break-word; margin: 6px 0 0 0; }
figure.plot { margin: 20px 0; page-break-inside: avoid; }
figure.plot img { max-width: 100%; border: 1px solid #dadce0; }
figcaption { font-size: 0.9em; color: #3c4043; }
details summary { cursor: default; color: #5f6368; font-size: 0.9em; }
details pre { font-size: 0.85em; white-space: pre-wrap; word-break: break-word; }
@media print { body { padding: 0; } header.verdict { -webkit-print-color-adjust: exact;
  print-color-adjust: exact; } }
"""


# ---------------------------------------------------------------------------------------------------------
# Formatting helpers


def _e(value: Any) -> str:
    """HTML-escape any value (None becomes an em dash)."""
    if value is None:
        return "&mdash;"
    return html.escape(str(value), quote=True)


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_p(value: Any) -> str:
    """A p-value as text: 3 significant digits, scientific when small; an exact 0 is "< 1e-300"."""
    p = _as_float(value)
    if p is None:
        return "—" if value is None else str(value)
    if math.isnan(p):
        return "NaN"
    if p == 0.0:
        return "< 1e-300"
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.3g}"


def format_number(value: Any) -> str:
    """A statistic as text: integers as they are, floats with 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    x = _as_float(value)
    if x is None:
        return str(value)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


def p_value_sentence(p_value: Any, level: Any) -> str:
    """E.g. "p = 1.2e-09, below the family-wise level 0.001" (plain text, not escaped)."""
    p = _as_float(p_value)
    lv = _as_float(level)
    level_text = (
        f"the family-wise level {format_p(lv)}" if lv is not None else "the family-wise level (not set)"
    )
    if p is None:
        return f"no p-value was computed; {level_text}"
    p_text = format_p(p)
    p_part = f"p {p_text}" if p_text.startswith("<") else f"p = {p_text}"
    if lv is None:
        return f"{p_part}; {level_text}"
    relation = "below" if p < lv else "not below"
    return f"{p_part}, {relation} {level_text}"


def _duration(started: Any, finished: Any) -> str | None:
    if not isinstance(started, str) or not isinstance(finished, str):
        return None
    try:
        seconds = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    except (ValueError, TypeError):
        return None
    if seconds < 0:
        return None
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _finite(values: Iterable[Any]) -> np.ndarray:
    """The finite numeric values of ``values`` as a float array (non-numeric entries are dropped)."""
    out = [x for x in (_as_float(v) for v in values) if x is not None and math.isfinite(x)]
    return np.asarray(out, dtype=float)


# ---------------------------------------------------------------------------------------------------------
# Plots


def _new_figure() -> Figure:
    fig = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    return fig


def _pad_x(ax: Any, xs: list[float]) -> None:
    """Show every point in ``xs`` with a 5% margin, so that the suspect's mark never sits on the frame."""
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.05, 0.05)
    ax.set_xlim(lo - pad, hi + pad)


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def null_distribution_png(
    name: str, null_samples: list[float], observed: float | None, p_value: float | None
) -> bytes:
    """Histogram of a test's null samples with the suspect's observed statistic marked (PNG bytes)."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    samples = _finite(null_samples)
    if samples.size:
        bins = int(min(50, max(10, math.sqrt(samples.size) * 2)))
        ax.hist(
            samples,
            bins=bins,
            color="#8ab4f8",
            edgecolor="#4a6fa5",
            linewidth=0.5,
            label=f"null samples (n={samples.size})",
        )
    else:
        ax.text(
            0.5, 0.5, "no null samples", ha="center", va="center", transform=ax.transAxes, color="#5f6368"
        )
    obs = _as_float(observed)
    if obs is not None and math.isfinite(obs):
        label = f"suspect = {format_number(obs)}"
        if p_value is not None:
            p_text = format_p(p_value)
            label += f" (p {p_text})" if p_text.startswith("<") else f" (p = {p_text})"
        ax.axvline(obs, color="#b3261e", linewidth=2.0, label=label)
    _pad_x(ax, [*samples.tolist(), *([obs] if obs is not None and math.isfinite(obs) else [])])
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("test statistic", fontsize=9)
    ax.set_ylabel("count", fontsize=9)
    ax.tick_params(labelsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", frameon=False)
    fig.tight_layout()
    return _png_bytes(fig)


def _reference_value(entry: Mapping[str, Any]) -> float | None:
    for key in ("value", "agreement", "distance", "statistic"):
        if key in entry:
            return _as_float(entry[key])
    return None


def agreement_png(reference: list[dict[str, Any]], suspect_value: float, label: str) -> bytes:
    """One point per reference model (``{"name": ..., "value": ...}``) with the suspect's value marked.

    The reference models were trained independently of our API; a stolen copy stands out from them
    (higher agreement, smaller distance).
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    values = [v for v in (_reference_value(r) for r in reference) if v is not None and math.isfinite(v)]
    if values:
        xs = np.asarray(values, dtype=float)
        # Deterministic jitter so that equal values stay visible.
        ys = (np.arange(xs.size) % 7 - 3) * 0.05
        ax.scatter(
            xs,
            ys,
            s=40,
            color="#4a6fa5",
            alpha=0.85,
            zorder=2,
            label=f"independent reference models (n={xs.size})",
        )
    else:
        ax.text(
            0.5,
            0.75,
            "no reference models",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#5f6368",
        )
    suspect = _as_float(suspect_value)
    if suspect is not None and math.isfinite(suspect):
        ax.axvline(suspect, color="#b3261e", linewidth=2.0, zorder=1)
        ax.scatter(
            [suspect],
            [0.0],
            s=120,
            marker="D",
            color="#b3261e",
            zorder=3,
            label=f"suspect = {format_number(suspect)}",
        )
    _pad_x(ax, [*values, *([suspect] if suspect is not None and math.isfinite(suspect) else [])])
    ax.set_ylim(-0.5, 0.5)
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=9)
    ax.set_title(f"{label}: suspect vs independent reference models", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", color="#e8eaed", zorder=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", frameon=False)
    fig.tight_layout()
    return _png_bytes(fig)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" width="600" height="300">'


def _plot_for_test(test: Mapping[str, Any]) -> bytes:
    name = str(test.get("name") or "")
    samples = list(test.get("null_samples") or [])
    observed = test.get("observed")
    if observed is None:
        observed = test.get("statistic")
    p_value = test.get("p_value_adjusted")
    if p_value is None:
        p_value = test.get("p_value")
    if name.startswith(REFERENCE_TEST_PREFIXES) and len(samples) < STRIP_PLOT_MAX_REFERENCES:
        reference = [{"name": f"reference {i + 1}", "value": v} for i, v in enumerate(samples)]
        obs = _as_float(observed)
        return agreement_png(reference, obs if obs is not None else math.nan, name)
    return null_distribution_png(name, samples, _as_float(observed), _as_float(p_value))


# ---------------------------------------------------------------------------------------------------------
# HTML sections


def _kv_table(rows: list[tuple[str, str]]) -> str:
    """Rows of (label, already-escaped HTML)."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _header(report: Mapping[str, Any]) -> str:
    verdict = report.get("verdict")
    verdict_key = verdict if isinstance(verdict, str) else ""
    colour = VERDICT_COLOURS.get(verdict_key, NO_VERDICT_COLOUR)
    title = VERDICT_TITLES.get(verdict_key, "NO VERDICT" if not verdict_key else verdict_key.upper())
    lead = VERDICT_LEADS.get(verdict_key, "")
    suspect = report.get("suspect") or {}
    sentence = p_value_sentence(report.get("p_value"), report.get("level"))
    parts = [
        f'<header class="verdict" style="--vc: {colour}">',
        f"<h1>Model theft evidence report: scan {_e(report.get('scan_id'))}, suspect "
        f"&ldquo;{_e(suspect.get('name'))}&rdquo;</h1>",
        f'<div>Verdict: <span class="verdict-badge" id="verdict">{_e(title)}</span>'
        f' <span class="muted">(status: {_e(report.get("status"))})</span></div>',
        f'<p class="pline" id="p-value">{_e(sentence)}</p>',
    ]
    if lead:
        parts.append(f"<p>{_e(lead)}</p>")
    if report.get("explanation"):
        parts.append(f'<p class="explanation">{_e(report.get("explanation"))}</p>')
    parts.append("</header>")
    return "\n".join(parts)


def _compared(report: Mapping[str, Any]) -> str:
    suspect = report.get("suspect") or {}
    model = report.get("model") or {}
    fingerprint = report.get("fingerprint") or {}
    client = report.get("client")
    counts = report.get("probe_counts") or {}

    suspect_rows = [
        ("Suspect", f'{_e(suspect.get("name"))} <span class="muted">(id {_e(suspect.get("id"))})</span>'),
        ("URL", f'<span class="mono">{_e(suspect.get("url"))}</span>'),
        ("Protocol", _e(suspect.get("protocol"))),
        ("Remote model name", _e(suspect.get("remote_model"))),
    ]
    classes = model.get("classes") or []
    model_rows = [
        ("Our model", f"{_e(model.get('name'))} version {_e(model.get('version'))}"),
        (
            "SHA-256 of the model artifact (static fingerprint)",
            f'<span class="mono">{_e(model.get("sha256"))}</span>',
        ),
        ("Classes", _e(", ".join(str(c) for c in classes)) if classes else _e(None)),
        ("Fingerprint scheme", _e(fingerprint.get("scheme"))),
        (
            "Fingerprint key id (the key itself is never shown)",
            f'<span class="mono">{_e(fingerprint.get("key_id"))}</span>',
        ),
        ("Fingerprint strength α", _e(format_number(fingerprint.get("alpha")))),
    ]
    if isinstance(client, Mapping):
        chain_ok = client.get("chain_ok")
        if chain_ok is True:
            chain_text = '<span class="ok">verified: the hash chain of the recorded history is intact</span>'
        elif chain_ok is False:
            chain_text = (
                '<span class="bad">NOT verified: the hash chain of the recorded history is broken</span>'
            )
        else:
            chain_text = _e("not checked")
        client_rows = [
            (
                "Client whose query history was replayed",
                f'{_e(client.get("name"))} <span class="muted">(id {_e(client.get("id"))})</span>',
            ),
            ("Recorded queries (chain length)", _e(format_number(client.get("chain_length")))),
            ("Chain head", f'<span class="mono">{_e(client.get("chain_head"))}</span>'),
            ("History integrity", chain_text),
        ]
    else:
        client_rows = [("Client whose query history was replayed", "none (no client history was replayed)")]

    tested = report.get("clients_tested") or []
    if tested:
        items = "".join(
            f"<li>{_e(c.get('name'))} (id {_e(c.get('id'))}): {_e(format_number(c.get('replayed')))} "
            "queries replayed</li>"
            for c in tested
            if isinstance(c, Mapping)
        )
        client_rows.append(("Clients tested", f"<ul>{items}</ul>"))

    duration = _duration(report.get("started_at"), report.get("finished_at"))
    run_rows = [
        (
            "Probes sent to the suspect",
            f"{_e(format_number(counts.get('total')))} in total: {_e(format_number(counts.get('control')))} "
            f"control, {_e(format_number(counts.get('replay')))} replayed from client history",
        ),
        ("Started", _e(report.get("started_at"))),
        (
            "Finished",
            _e(report.get("finished_at"))
            + (f' <span class="muted">({_e(duration)})</span>' if duration else ""),
        ),
        ("modelprint version", _e(report.get("software_version"))),
    ]
    return "\n".join(
        [
            '<section id="compared"><h2>What was compared</h2>',
            "<h3>The suspect</h3>",
            _kv_table(suspect_rows),
            "<h3>Our model and its fingerprint</h3>",
            _kv_table(model_rows),
            "<h3>Replayed query history</h3>",
            _kv_table(client_rows),
            "<h3>The scan</h3>",
            _kv_table(run_rows),
            "</section>",
        ]
    )


def _decision() -> str:
    return f'<section id="decision"><h2>How the decision is made</h2><p>{DECISION_TEXT}</p></section>'


def _tests_table(tests: list[Mapping[str, Any]], level: float | None) -> str:
    if not tests:
        return '<section id="tests"><h2>Tests</h2><p>No test was run.</p></section>'
    rows = []
    for test in tests:
        applicable = bool(test.get("applicable"))
        p_adj = _as_float(test.get("p_value_adjusted"))
        significant = applicable and p_adj is not None and level is not None and p_adj < level
        classes = [c for c, on in (("na", not applicable), ("significant", significant)) if on]
        details = test.get("details") or {}
        details_html = ""
        if details:
            dumped = json.dumps(details, indent=1, sort_keys=True, default=str)
            details_html = f"<details><summary>details</summary><pre>{_e(dumped)}</pre></details>"
        rows.append(
            f'<tr class="{" ".join(classes)}" data-test="{_e(test.get("name"))}">'
            f'<td class="mono">{_e(test.get("name"))}</td>'
            f"<td>{'yes' if applicable else 'no'}</td>"
            f'<td class="num">{_e(format_number(test.get("statistic")))}</td>'
            f'<td class="num">{_e(format_p(test.get("p_value_empirical")))}</td>'
            f'<td class="num">{_e(format_p(test.get("p_value_parametric")))}</td>'
            f'<td class="num">{_e(format_p(test.get("p_value")))}</td>'
            f'<td class="num padj">{_e(format_p(test.get("p_value_adjusted")))}'
            f"{' &#10033;' if significant else ''}</td>"
            f"<td>{_e(test.get('explanation') or '')}{details_html}</td></tr>"
        )
    head = (
        "<tr><th>Test</th><th>Applicable</th><th>Statistic</th><th>p empirical</th><th>p parametric</th>"
        "<th>p of the test</th><th>p adjusted (Holm)</th><th>Explanation</th></tr>"
    )
    note = (
        f'<p class="muted">&#10033; adjusted p-value below the level {_e(format_p(level))}. '
        "Tests that were not applicable to this suspect are listed but take no part in the decision.</p>"
    )
    return f'<section id="tests"><h2>Tests</h2><table>{head}{"".join(rows)}</table>{note}</section>'


def _plots(tests: list[Mapping[str, Any]]) -> str:
    figures = []
    for test in tests:
        if not test.get("applicable") or not test.get("null_samples"):
            continue
        name = str(test.get("name") or "")
        try:
            png = _plot_for_test(test)
        except (ValueError, TypeError, OverflowError) as exc:  # a bad sample must not lose the report
            figures.append(
                f'<figure class="plot" data-test="{_e(name)}"><figcaption>{_e(name)}: the plot could not be '
                f"drawn ({_e(type(exc).__name__)}).</figcaption></figure>"
            )
            continue
        n = len(test.get("null_samples") or [])
        if name.startswith(REFERENCE_TEST_PREFIXES) and n < STRIP_PLOT_MAX_REFERENCES:
            caption = (
                f"{name}: each blue point is one of {n} reference models trained independently of our API; "
                "the red diamond and line are the suspect."
            )
        else:
            caption = (
                f"{name}: distribution of the test statistic under independence ({n} null samples); "
                "the red line is the suspect's value."
            )
        figures.append(
            f'<figure class="plot" data-test="{_e(name)}">{_img(png, name)}'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    if not figures:
        return ""
    return '<section id="plots"><h2>The suspect against the null</h2>' + "\n".join(figures) + "</section>"


def _error(report: Mapping[str, Any]) -> str:
    error = report.get("error")
    if not error:
        return ""
    text = error if isinstance(error, str) else json.dumps(error, default=str)
    return (
        '<div class="error" id="error"><strong>The scan failed</strong> '
        f"(status {_e(report.get('status'))}). No verdict of theft can be drawn from it."
        f"<pre>{_e(text)}</pre></div>"
    )


def render_html(report: dict[str, Any]) -> str:
    """Render a suspect-scan report dict as one self-contained HTML document (no scripts, no fetches)."""
    tests = [t for t in (report.get("tests") or []) if isinstance(t, Mapping)]
    level = _as_float(report.get("level"))
    suspect = report.get("suspect") or {}
    title = f"modelprint evidence report: scan {report.get('scan_id')} ({suspect.get('name')})"
    body = "\n".join(
        part
        for part in (
            _header(report),
            _error(report),
            _compared(report),
            _decision(),
            _tests_table(tests, level),
            _plots(tests),
        )
        if part
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
        '<footer class="muted"><p>Generated by modelprint from scan '
        f"{_e(report.get('scan_id'))}. This document is self-contained: it loads no external "
        "resources and runs no scripts.</p></footer>\n</body>\n</html>\n"
    )
