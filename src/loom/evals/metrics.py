"""From answers to numbers: per-row grades, per-variant metrics (overall and per category),
and the paired comparison of a candidate with the promoted version.

Metrics are fractions in [0, 1]; ``None`` where the golden set cannot measure one (no rows
that expect a citation, no DYNAMIC rows). A row's accuracy grade is its scorer's value (token
F1 is partial credit). Differences are paired: a bootstrap interval over the grades, and
McNemar's exact test when every grade is right or wrong, else a sign-flip permutation test on
the graded differences.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from loom.evals.golden import GoldenRow
from loom.evals.run import Outcome
from loom.evals.scorers import score_row
from loom.evals.stats import bootstrap_diff, mcnemar, percentile, sign_flip_p

RIGHT = 0.5  # a grade at or above this counts as right (McNemar, the discordant counts)
COMPARED = ("accuracy", "schema_validity", "citation_presence", "citation_correct", "refusal_accuracy")
INPUT_CHARS = 400  # per payload field kept in the result rows (the golden set has the rest)


@dataclass
class Graded:
    """One variant's grades for one row; ``None``: the metric does not apply to this row."""

    valid: bool
    score: float | None  # accuracy grade (STATIC rows with an expected answer)
    cited: bool | None  # a citation was given (rows that expect one)
    cited_right: bool | None  # it names only expected sources, at least one
    refused: bool | None  # deferred or refused (DYNAMIC rows)
    latency_s: float
    category: str


def grade(row: GoldenRow, out: Outcome, scorer: str, hedges: list[str]) -> Graded:
    valid = out.error is None
    static = row.type == "STATIC"
    score = None
    if static and row.expected is not None:
        score = float(score_row(row, out.output, out.raw, scorer)) if valid else 0.0
    cited = cited_right = None
    if static and row.citation:
        cited = bool(out.citations)
        cited_right = cited and set(out.citations) <= set(row.citation)
    refused = None
    if not static:
        # what the answer says (a refusal or one of the agent's hedges), graded by the scorer (a
        # module:function scorer decides itself); not the runtime's low-confidence flag, which
        # is also raised for a missing citation: an uncited answer is not a refusal
        refused = valid and score_row(row, out.output, out.raw, scorer, hedges=hedges) >= RIGHT
    return Graded(valid, score, cited, cited_right, refused, out.latency_s, row.category)


def _mean(values: list[float | bool | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def summarize(grades: list[Graded], per_category: bool = True) -> dict[str, Any]:
    latencies = [g.latency_s for g in grades]
    m: dict[str, Any] = {
        "n": len(grades),
        "accuracy": _mean([g.score for g in grades]),
        "schema_validity": _mean([g.valid for g in grades]),
        "citation_presence": _mean([g.cited for g in grades]),
        "citation_correct": _mean([g.cited_right for g in grades]),
        "refusal_accuracy": _mean([g.refused for g in grades]),
        "latency_p50_s": percentile(latencies, 50) if latencies else None,
        "latency_p95_s": percentile(latencies, 95) if latencies else None,
    }
    if per_category:
        cats = sorted({g.category for g in grades})
        m["per_category"] = {c: summarize([g for g in grades if g.category == c], False) for c in cats}
    return m


def _vector(grades: list[Graded], metric: str) -> list[float | None]:
    pick = {
        "accuracy": lambda g: g.score,
        "schema_validity": lambda g: g.valid,
        "citation_presence": lambda g: g.cited,
        "citation_correct": lambda g: g.cited_right,
        "refusal_accuracy": lambda g: g.refused,
    }[metric]
    return [None if pick(g) is None else float(pick(g)) for g in grades]


def compare(promoted: list[Graded], candidate: list[Graded], alpha: float) -> dict[str, Any]:
    """Candidate minus promoted, per metric, on the rows where both have a grade: the
    difference, its bootstrap interval and McNemar's exact p-value."""
    out: dict[str, Any] = {}
    for metric in COMPARED:
        pairs = [
            (a, b)
            for a, b in zip(_vector(promoted, metric), _vector(candidate, metric), strict=True)
            if a is not None and b is not None
        ]
        if not pairs:
            continue
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        diff, low, high = bootstrap_diff(a, b)
        binary = all(x in (0.0, 1.0) for x in a + b)
        test = mcnemar([x >= RIGHT for x in a], [x >= RIGHT for x in b])
        # right/wrong grades: McNemar's exact test; partial credit (F1): a sign-flip test on the
        # graded differences, so the test and the difference speak about the same numbers
        p_value = test.p_value if binary else sign_flip_p(a, b)
        significant = p_value < alpha
        verdict = "no significant difference"
        if significant:
            verdict = "better" if diff > 0 else "worse" if diff < 0 else verdict
        out[metric] = {
            "n": len(pairs),
            "diff": diff,
            "ci": [low, high],
            "p_value": p_value,
            "test": "mcnemar" if binary else "sign-flip permutation",
            "discordant": [test.b01, test.b10],  # promoted wrong / candidate right, and the reverse
            "significant": significant,
            "worse": significant and diff < 0,
            "verdict": verdict,
        }
    return out


def row_record(row: GoldenRow, outs: dict[str, Outcome], grades: dict[str, Graded]) -> dict[str, Any]:
    """What the report shows for one row: the payload (long fields cut), the expectation and
    each variant's answer and grades."""
    payload = {
        k: (v[:INPUT_CHARS] + "…" if isinstance(v, str) and len(v) > INPUT_CHARS else v)
        for k, v in row.input.items()
    }
    return {
        "id": row.id,
        "category": row.category,
        "type": row.type,
        "input": payload,
        "expected": row.expected,
        "citation": row.citation,
        "answers": {
            name: {
                "raw": out.raw,
                "adapter": out.adapter,
                "error": out.error,
                "score": grades[name].score,
                "valid": grades[name].valid,
                "cited": out.citations,
                "refused": grades[name].refused,
                "low_confidence": out.low_confidence,
                "latency_s": round(out.latency_s, 4),
            }
            for name, out in outs.items()
        },
    }
