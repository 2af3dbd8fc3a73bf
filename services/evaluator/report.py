"""The evaluation report: a JSON document and a readable HTML page, both stored beside the adapter.

The page is self-contained (inline SVG charts, no scripts, no external assets): the metrics
before and after, the training loss curve from loss_curve.json, and every probe side by side.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime

from tunebus.contracts import EvaluationCompleted, TrainingCompleted
from tunebus.contracts.evaluation import MetricChange

from .compare import ProbeResult

REPORT_JSON = "evaluation.json"
REPORT_HTML = "evaluation.html"


def report_document(summary: EvaluationCompleted, probes: list[ProbeResult],
                    training: TrainingCompleted, loss_curve: list[dict]) -> dict:
    """Everything the evaluation found, as JSON: the summary the event carries, and the details."""
    request = training.request
    return {
        "summary": summary.model_dump(mode="json"),
        "adapter": {
            "name": request.adapter_name, "job_id": training.job_id,
            "adapter_uri": training.adapter_uri, "base_model": request.base_model,
            "base_model_revision": request.base_model_revision, "method": request.method,
            "lora": request.adapter.model_dump(mode="json"),
            "hyperparameters": request.hyperparameters.model_dump(mode="json"),
            "backend": training.backend,
        },
        "dataset": training.dataset.model_dump(mode="json"),
        "training": training.metrics.model_dump(mode="json"),
        "loss_curve": loss_curve,
        "probes": [
            {
                "source": p.case.source,
                "prompt": p.case.question,
                "expected": p.case.expected,
                "reference": p.case.reference,
                "base": {"answer": p.before.text, "seconds": p.before.seconds, "tokens": p.before.tokens,
                         **_scores(p.before_score)},
                "adapter": {"answer": p.after.text, "seconds": p.after.seconds, "tokens": p.after.tokens,
                            **_scores(p.after_score)},
                "regressed": p.regressed,
            }
            for p in probes
        ],
        "generated_at": datetime.now(UTC).isoformat(),
    }


def render_html(document: dict) -> str:
    summary = EvaluationCompleted.model_validate(document["summary"])
    adapter = document["adapter"]
    title = f"Evaluation of {adapter['name']} ({adapter['job_id']})"
    verdict = ("<p class=bad>Regression: " + html.escape(", ".join(summary.regressions) or
               f"{summary.probes.regressions if summary.probes else 0} probe(s) got worse") + "</p>"
               if summary.regressed else "<p class=good>No regression.</p>")
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _facts(document),
        verdict,
        "<h2>Base model vs base + adapter</h2>",
        _metrics_table(summary.metrics),
        _bar_charts([m for m in summary.metrics if not m.informational]),
        "<h2>Training loss</h2>",
        _loss_chart(document.get("loss_curve") or []),
        "<h2>Probes, side by side</h2>",
        _probes_table(document.get("probes") or []),
        f"<footer>generated {html.escape(document.get('generated_at', ''))} by tunebus evaluator "
        f"({html.escape(summary.backend or '?')})</footer>",
        "</body></html>",
    ]
    return "\n".join(parts)


def to_json(document: dict) -> bytes:
    return json.dumps(document, indent=2).encode()


# -- pieces of the page


def _facts(document: dict) -> str:
    a, d, summary = document["adapter"], document["dataset"], document["summary"]
    lora = a["lora"]
    rows = [
        ("base model", a["base_model"] + (f" @ {a['base_model_revision']}" if a["base_model_revision"] else "")),
        ("adapter", f"{a['adapter_uri']} ({a['method']}, {lora['type']} rank {lora['rank']}, "
                    f"alpha {lora['alpha']}, trained with {a['backend']})"),
        ("dataset", f"{d['format']}, {d['rows']} rows, sha256 {d['sha256'][:12]}…"),
        ("held-out split", f"{summary['examples']} examples, {summary['tokens']} scored tokens"),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class=facts>{cells}</table>"


def _metrics_table(metrics: list[MetricChange]) -> str:
    head = ("<tr><th>metric</th><th>base</th><th>base + adapter</th><th>change</th>"
            "<th>relative</th><th></th></tr>")
    rows = []
    for m in metrics:
        rel = f"{m.relative_change:+.1%}" if m.relative_change is not None else "–"
        flag = ("info" if m.informational else "regressed" if m.regressed
                else "better" if (m.improvement or 0) > 0 else "same")
        rows.append(
            f"<tr class={flag}><td>{html.escape(m.name)}{'' if m.higher_is_better else ' ↓'}</td>"
            f"<td>{m.before:.4g}</td><td>{m.after:.4g}</td><td>{m.absolute_change:+.4g}</td>"
            f"<td>{rel}</td><td>{flag}</td></tr>")
    return f"<table class=metrics>{head}{''.join(rows)}</table><p class=note>↓ lower is better</p>"


def _bar_charts(metrics: list[MetricChange]) -> str:
    """One small before/after bar pair per metric, each on its own scale."""
    charts = []
    for m in metrics:
        top = max(m.before, m.after, 1e-12)
        bars = []
        for i, (label, value, colour) in enumerate((("base", m.before, "#9aa5b1"),
                                                    ("adapter", m.after, "#2f7ed8"))):
            h = 90 * value / top
            x = 20 + i * 60
            bars.append(
                f"<rect x={x} y={110 - h:.1f} width=44 height={h:.1f} fill='{colour}'/>"
                f"<text x={x + 22} y=126 text-anchor=middle>{label}</text>"
                f"<text x={x + 22} y={105 - h:.1f} text-anchor=middle>{value:.3g}</text>")
        charts.append(
            f"<figure><svg width=150 height=135 viewBox='0 0 150 135' role=img "
            f"aria-label='{html.escape(m.name)} before and after'>{''.join(bars)}</svg>"
            f"<figcaption>{html.escape(m.name)}</figcaption></figure>")
    return f"<div class=charts>{''.join(charts)}</div>"


def _loss_chart(curve: list[dict]) -> str:
    series = {
        key: [(p["step"], p[key]) for p in curve if p.get(key) is not None]
        for key in ("train_loss", "val_loss")
    }
    points = [pt for s in series.values() for pt in s]
    if not points:
        return "<p>No loss curve was recorded.</p>"
    width, height, pad = 560, 220, 40
    x_max = max(x for x, _ in points) or 1
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    span = (y_max - y_min) or 1.0

    def xy(step: float, loss: float) -> str:
        return (f"{pad + (width - 2 * pad) * step / x_max:.1f},"
                f"{height - pad - (height - 2 * pad) * (loss - y_min) / span:.1f}")

    colours = {"train_loss": "#2f7ed8", "val_loss": "#e8743b"}
    lines = [
        f"<polyline fill=none stroke='{colours[key]}' stroke-width=2 points='{' '.join(xy(*p) for p in pts)}'/>"
        + "".join(f"<circle cx={xy(*p).split(',')[0]} cy={xy(*p).split(',')[1]} r=2.5 "
                  f"fill='{colours[key]}'/>" for p in pts)
        for key, pts in series.items() if pts
    ]
    axes = (
        f"<line x1={pad} y1={height - pad} x2={width - pad} y2={height - pad} stroke='#555'/>"
        f"<line x1={pad} y1={pad} x2={pad} y2={height - pad} stroke='#555'/>"
        f"<text x={pad} y={pad - 8}>{y_max:.3g}</text>"
        f"<text x={pad - 4} y={height - pad + 4} text-anchor=end>{y_min:.3g}</text>"
        f"<text x={width - pad} y={height - pad + 16} text-anchor=end>step {x_max}</text>"
    )
    legend = "".join(
        f"<text x={width - pad - 150 + i * 80} y={pad - 8} fill='{colours[k]}'>{k.replace('_', ' ')}</text>"
        for i, k in enumerate(k for k, pts in series.items() if pts))
    return (f"<svg width={width} height={height} viewBox='0 0 {width} {height}' role=img "
            f"aria-label='training loss by step'>{axes}{''.join(lines)}{legend}</svg>")


def _probes_table(probes: list[dict]) -> str:
    if not probes:
        return "<p>No probes were asked.</p>"
    head = ("<tr><th>prompt</th><th>expected / reference</th><th>base model</th>"
            "<th>base + adapter</th></tr>")
    rows = []
    for p in probes:
        want = p["expected"] if p["expected"] is not None else p["reference"]
        rows.append(
            f"<tr class={'regressed' if p['regressed'] else ''}>"
            f"<td>{html.escape(p['prompt'])}<div class=note>{p['source']}</div></td>"
            f"<td>{html.escape(want) if want is not None else '–'}</td>"
            f"<td>{_answer_cell(p['base'])}</td><td>{_answer_cell(p['adapter'])}</td></tr>")
    return f"<table class=probes>{head}{''.join(rows)}</table>"


def _answer_cell(side: dict) -> str:
    marks = []
    for key, label in (("contains", "contains"), ("exact_match", "exact"), ("rouge_l", "ROUGE-L")):
        if side.get(key) is not None:
            value = side[key]
            marks.append(f"{label} {'✓' if value == 1 else '✗'}" if key != "rouge_l" else f"{label} {value:.2f}")
    marks.append(f"{side['seconds'] * 1000:.0f} ms, {side['tokens']} tokens")
    return f"{html.escape(side['answer']) or '<i>(empty)</i>'}<div class=note>{' · '.join(marks)}</div>"


def _scores(s) -> dict:
    return {"exact_match": s.exact_match, "contains": s.contains, "rouge_l": s.rouge_l}


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:.35em .6em;
text-align:left;vertical-align:top}.metrics td:nth-child(n+2){text-align:right;font-variant-numeric:
tabular-nums}tr.regressed{background:#fde8e8}tr.better td:last-child{color:#1a7f37}
.good{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}.note{color:#777;
font-size:.85em}.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;text-align:center}
svg text{font-size:11px;fill:#333}.probes td{max-width:320px;white-space:pre-wrap}footer{color:#777;
margin-top:2em;font-size:.85em}
"""
