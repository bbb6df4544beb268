"""``loom eval --report DIR``: the run as markdown and as one self-contained HTML page.

The plots are inline SVG drawn here rather than with a plotting library: a page that opens
anywhere (no scripts, no files beside it) from a handful of rectangles did not justify adding
matplotlib's weight to every install.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from loom.evals.stats import bootstrap_diff

COLORS = ("#2b6cb0", "#dd6b20", "#718096", "#38a169", "#805ad5")
METRICS = (
    ("accuracy", "accuracy"),
    ("schema_validity", "schema valid"),
    ("citation_presence", "citation given"),
    ("citation_correct", "citation right"),
    ("refusal_accuracy", "refusal accuracy"),
    ("latency_p50_s", "latency p50 (s)"),
    ("latency_p95_s", "latency p95 (s)"),
)
WORST = 8
STYLE = (
    "body{font:14px system-ui,sans-serif;max-width:1100px;margin:2em auto}pre{white-space:pre-wrap;margin:0}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
)


def fmt_metric(value: Any, metric: str = "") -> str:
    if value is None:
        return "-"
    if metric.startswith("latency"):
        return f"{value:.2f}"
    return f"{100 * value:.1f}%" if isinstance(value, float) else str(value)


def merged_variants(bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every variant of the run once: each body's candidate under its ref's label, the
    promoted version and the base from the first body."""
    out: dict[str, dict[str, Any]] = {}
    for i, body in enumerate(bodies):
        label = "candidate" if i == 0 else f"candidate-{i + 1}"
        out[label] = body["variants"]["candidate"]
    for label in ("promoted", "base"):
        if label in bodies[0]["variants"]:
            out[label] = bodies[0]["variants"][label]
    return out


def _row_scores(bodies: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    index = 0 if not label.startswith("candidate-") else int(label.split("-")[1]) - 1
    body = bodies[index] if label.startswith("candidate") else bodies[0]
    key = "candidate" if label.startswith("candidate") else label
    return [{"category": r["category"], **r["answers"][key]} for r in body["rows"]]


# ------------------------------------------------------------------ markdown
def markdown(bodies: list[dict[str, Any]], gates: list[dict[str, Any]] | None = None) -> str:
    first = bodies[0]
    variants = merged_variants(bodies)
    lines = [
        f"# loom eval: {first['agent']}",
        "",
        f"Golden set `{first['golden']['ref']}` ({first['golden']['rows']} rows, sha256 "
        f"`{first['golden']['sha256'][:12]}`), base `{first['base']}`, {first['created_at']}.",
        f"Engine: {json.dumps({k: v for k, v in first['engine'].items() if k != 'generation'})}.",
        "",
        "| metric | " + " | ".join(f"{k} `{v['ref']}`" for k, v in variants.items()) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for key, title in METRICS:
        lines.append(
            f"| {title} | "
            + " | ".join(fmt_metric(v["metrics"].get(key), key) for v in variants.values())
            + " |"
        )
    for _i, body in enumerate(bodies):
        comparison = body.get("comparison")
        if not comparison:
            continue
        lines += ["", f"Candidate `{body['subject']}` vs promoted `{comparison['against']}`:", ""]
        lines += [
            "| metric | difference | 95% interval | p (McNemar) | verdict |",
            "|---|---:|---:|---:|---|",
        ]
        for metric, c in comparison["metrics"].items():
            lo, hi = c["ci"]
            lines.append(
                f"| {metric} | {100 * c['diff']:+.1f} pts | [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"| {c['p_value']:.3g} | {c['verdict']} |"
            )
    if gates:
        lines += ["", "Gates:", "", "| gate | threshold | value | result |", "|---|---:|---:|---|"]
        for g in gates:
            lines.append(
                f"| {g['name']} | {g.get('threshold')} | {g.get('value')} | "
                f"{'pass' if g['passed'] else 'FAIL'} {g.get('detail') or ''} |"
            )
    lines += ["", "## Per category", "", *_category_table(variants)]
    lines += ["", "## Worst examples (candidate)", "", *_worst_md(first)]
    return "\n".join(lines) + "\n"


def _category_table(variants: dict[str, dict[str, Any]]) -> list[str]:
    cats = sorted({c for v in variants.values() for c in v["metrics"].get("per_category", {})})
    out = ["| category | n | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    for cat in cats:
        per = [v["metrics"]["per_category"].get(cat, {}) for v in variants.values()]
        n = next((p.get("n") for p in per if p), 0)
        out.append(
            f"| {cat} | {n} | " + " | ".join(fmt_metric(p.get("accuracy"), "accuracy") for p in per) + " |"
        )
    return out


def worst_rows(body: dict[str, Any], k: int = WORST) -> list[dict[str, Any]]:
    """The candidate's lowest grades, where the promoted version (or the base) did better first."""

    def key(r: dict[str, Any]) -> tuple[float, float]:
        mine = r["answers"]["candidate"]["score"]
        other = r["answers"].get("promoted", r["answers"].get("base", {})).get("score")
        return (mine if mine is not None else 1.0, -(other or 0.0))

    graded = [r for r in body["rows"] if r["answers"]["candidate"]["score"] is not None]
    return sorted(graded, key=key)[:k]


def _worst_md(body: dict[str, Any]) -> list[str]:
    out = []
    for r in worst_rows(body):
        out.append(f"- `{r['id']}` ({r['category']}): expected `{json.dumps(r['expected'])[:200]}`")
        for label, a in r["answers"].items():
            out.append(f"  - {label}: `{a['raw'][:200]}` (grade {fmt_metric(a['score'], 'accuracy')})")
    return out or ["(no graded rows)"]


# ------------------------------------------------------------------ svg
def _bars_svg(bodies: list[dict[str, Any]], variants: dict[str, dict[str, Any]]) -> str:
    """Per-category accuracy, one bar per variant, with 95% bootstrap intervals."""
    cats = sorted({c for v in variants.values() for c in v["metrics"].get("per_category", {})})
    width, height, pad = max(360, 60 + len(cats) * 22 * (len(variants) + 1)), 240, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}">']
    bar = 18
    for ci, cat in enumerate(cats):
        x0 = pad + ci * bar * (len(variants) + 1)
        for vi, label in enumerate(variants):
            scores = [r["score"] for r in _row_scores(bodies, label) if r["category"] == cat]
            scores = [s for s in scores if s is not None]
            if not scores:
                continue
            mean, lo, hi = bootstrap_diff([0.0] * len(scores), scores, resamples=500)
            x, y = x0 + vi * bar, height - mean * (height - pad)
            color = COLORS[vi % len(COLORS)]
            parts.append(
                f'<rect x="{x}" y="{y:.1f}" width="{bar - 3}" height="{height - y:.1f}" fill="{color}"/>'
            )
            ylo, yhi = height - lo * (height - pad), height - hi * (height - pad)
            mid = x + (bar - 3) / 2
            parts.append(f'<line x1="{mid}" x2="{mid}" y1="{ylo:.1f}" y2="{yhi:.1f}" stroke="#000"/>')
        label_x = x0 + bar * len(variants) / 2
        parts.append(
            f'<text x="{label_x}" y="{height + 14}" font-size="10" text-anchor="end" '
            f'transform="rotate(-35 {label_x} {height + 14})">{html.escape(cat[:18])}</text>'
        )
    parts.append(f'<line x1="{pad - 4}" x2="{width}" y1="{height}" y2="{height}" stroke="#444"/>')
    parts.append(
        f'<text x="2" y="{pad}" font-size="10">100%</text><text x="2" y="{height}" font-size="10">0</text>'
    )
    return "".join(parts) + "</svg>"


def _latency_svg(bodies: list[dict[str, Any]], variants: dict[str, dict[str, Any]]) -> str:
    """Latency histograms, one outline per variant, shared bins."""
    series = {label: [r["latency_s"] for r in _row_scores(bodies, label)] for label in variants}
    top = max((max(v) for v in series.values() if v), default=1.0) or 1.0
    bins, width, height, pad = 24, 480, 180, 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 40}" height="{height + 40}">']
    for vi, (label, values) in enumerate(series.items()):
        counts = Counter(min(bins - 1, int(v / top * bins)) for v in values)
        peak = max(counts.values(), default=1)
        points = " ".join(
            f"{pad + b * width / bins:.1f},{height - counts.get(b, 0) / peak * (height - 20):.1f}"
            for b in range(bins)
        )
        color = COLORS[vi % len(COLORS)]
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        name = html.escape(label)
        parts.append(f'<text x="{pad + 10}" y="{14 + 12 * vi}" font-size="11" fill="{color}">{name}</text>')
    parts.append(f'<text x="{pad}" y="{height + 16}" font-size="10">0 s</text>')
    parts.append(f'<text x="{pad + width - 30}" y="{height + 16}" font-size="10">{top:.2f} s</text>')
    return "".join(parts) + "</svg>"


# ------------------------------------------------------------------ confusion
def confusion(body: dict[str, Any]) -> tuple[list[str], dict[tuple[str, str], int]] | None:
    """Gold label x predicted label of the candidate, for agents whose expected answer is one
    JSON field (classification); None for other agents."""
    rows = [r for r in body["rows"] if isinstance(r["expected"], dict) and len(r["expected"]) == 1]
    if not rows or len(rows) < len(body["rows"]) / 2:
        return None
    field = next(iter(rows[0]["expected"]))
    cells: Counter[tuple[str, str]] = Counter()
    for r in rows:
        try:
            predicted = json.loads(r["answers"]["candidate"]["raw"]).get(field)
        except (ValueError, AttributeError):
            predicted = None
        cells[(str(r["expected"][field]), "(invalid)" if predicted is None else str(predicted))] += 1
    labels = sorted({g for g, _ in cells} | {p for _, p in cells})
    return labels, dict(cells)


def _confusion_html(body: dict[str, Any]) -> str:
    found = confusion(body)
    if found is None:
        return "<p>(not a classification agent)</p>"
    labels, cells = found
    peak = max(cells.values())
    head = "".join(f"<th>{html.escape(p)}</th>" for p in labels)
    rows = []
    for g in labels:
        counts = [cells.get((g, p), 0) for p in labels]
        tds = "".join(f'<td style="background:rgba(43,108,176,{n / peak:.2f})">{n}</td>' for n in counts)
        rows.append(f"<tr><th>{html.escape(g)}</th>{tds}</tr>")
    return f"<table class=cm><tr><th>gold \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


# ------------------------------------------------------------------ html
def html_page(bodies: list[dict[str, Any]], md: str) -> str:
    variants = merged_variants(bodies)
    worst = []
    for r in worst_rows(bodies[0]):
        cells = "".join(
            f"<td><pre>{html.escape(a['raw'][:300])}</pre>{fmt_metric(a['score'], 'accuracy')}</td>"
            for a in r["answers"].values()
        )
        worst.append(
            f"<tr><td>{html.escape(r['id'])}<br><small>{html.escape(r['category'])}</small></td>"
            f"<td><pre>{html.escape(json.dumps(r['input'], ensure_ascii=False)[:400])}</pre></td>"
            f"<td><pre>{html.escape(json.dumps(r['expected'], ensure_ascii=False)[:200])}</pre></td>"
            f"{cells}</tr>"
        )
    heads = (
        "".join(f"<th>{html.escape(k)}</th>" for k in bodies[0]["rows"][0]["answers"])
        if bodies[0]["rows"]
        else ""
    )
    legend = " ".join(
        f'<span style="color:{COLORS[i % len(COLORS)]}">■ {html.escape(k)} {html.escape(v["ref"])}</span>'
        for i, (k, v) in enumerate(variants.items())
    )
    agent = html.escape(bodies[0]["agent"])
    summary = html.escape(md.split("## Per category")[0])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>loom eval {agent}</title>
<style>{STYLE}</style></head><body>
<h1>loom eval: {agent}</h1>
<details open><summary>Summary (markdown)</summary><pre>{summary}</pre></details>
<h2>Accuracy per category (95% intervals)</h2><p>{legend}</p>{_bars_svg(bodies, variants)}
<h2>Latency</h2>{_latency_svg(bodies, variants)}
<h2>Confusion matrix (candidate)</h2>{_confusion_html(bodies[0])}
<h2>Worst examples</h2><table><tr><th>row</th><th>input</th><th>expected</th>{heads}</tr>
{"".join(worst)}</table>
</body></html>
"""


def write_report(
    bodies: list[dict[str, Any]], out: Path, gates: list[dict[str, Any]] | None = None
) -> list[Path]:
    if not bodies:
        raise ValueError("no eval results to report")
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(bodies, gates)
    paths = [out / "report.md", out / "report.html"]
    paths[0].write_text(md, encoding="utf-8")
    paths[1].write_text(html_page(bodies, md), encoding="utf-8")
    return paths
