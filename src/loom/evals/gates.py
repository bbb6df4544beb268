"""Promotion gates: the bar (``loom.agents.spec.Gates``) a candidate's eval must clear.

Thresholds are checked on ``body["variants"]["candidate"]["metrics"]``; ``no_regression`` on
``body["comparison"]["metrics"]`` (candidate vs the promoted version), with significance
recomputed from each metric's p-value at the gates' ``alpha``: the runner's own flag was
taken at its level, not necessarily the agent's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loom.errors import LoomError

if TYPE_CHECKING:  # loom.agents imports the engine (torch); gates only read its fields
    from loom.agents.spec import Gates

# gate name -> (metric key in the candidate's metrics, a value passes when ...)
_THRESHOLDS: dict[str, tuple[str, str, Callable[[float, float], bool]]] = {
    "accuracy": ("accuracy", ">=", lambda v, t: v >= t),
    "schema_validity": ("schema_validity", ">=", lambda v, t: v >= t),
    "citation_presence": ("citation_presence", ">=", lambda v, t: v >= t),
    "refusal_accuracy": ("refusal_accuracy", ">=", lambda v, t: v >= t),
    "p95_latency_s": ("latency_p95_s", "<", lambda v, t: v < t),
}


@dataclass(frozen=True)
class GateResult:
    name: str
    threshold: float | None  # no_regression: the significance level alpha
    value: float | None  # no_regression: how many metrics are significantly worse
    passed: bool
    detail: str
    measured: bool = True  # False: skipped, the eval could not measure it (passes)


def check_gates(body: dict[str, Any], gates: Gates) -> list[GateResult]:
    """Each switched-on gate's result on one eval body; a metric the eval could not measure
    (null) is skipped and says "not measured"."""
    candidate = (body.get("variants") or {}).get("candidate") or {}
    metrics = candidate.get("metrics")
    if not isinstance(metrics, dict):
        raise LoomError(
            f"eval {body.get('eval_id')!r} has no variants.candidate.metrics; it is not a "
            f"'loom eval' result: run 'loom eval' again"
        )
    results = []
    for name, (key, op, ok) in _THRESHOLDS.items():
        threshold = getattr(gates, name)
        if threshold is not None:
            results.append(_threshold(name, key, op, ok, metrics.get(key), float(threshold)))
    if gates.no_regression:
        results.append(_no_regression(body.get("comparison"), gates.alpha))
    return results


def passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def use_cases(body: dict[str, Any], gates: Gates) -> list[str]:
    """The golden set's categories where this version passes its threshold gates (the
    version's ``recommended_use_cases`` once it has an eval; the comparison gate is about the
    whole set and does not apply per category)."""
    candidate = (body.get("variants") or {}).get("candidate") or {}
    per = (candidate.get("metrics") or {}).get("per_category") or {}
    found = []
    for category, metrics in sorted(per.items()):
        fake = {"variants": {"candidate": {"metrics": metrics}}}
        if passed(check_gates(fake, gates.model_copy(update={"no_regression": False}))):
            found.append(category)
    return found


def _threshold(
    name: str, key: str, op: str, ok: Callable[[float, float], bool], value: Any, threshold: float
) -> GateResult:
    if value is None:
        return GateResult(name, threshold, None, True, f"{key} not measured on this golden set", False)
    v = float(value)
    good = ok(v, threshold)
    return GateResult(name, threshold, v, good, f"{key} {v:.4g} {op if good else 'not ' + op} {threshold:g}")


def _lower_is_better(metric: str) -> bool:
    return metric.startswith("latency")


def _worse(metric: str, m: dict[str, Any]) -> bool:
    """Whether the candidate moved the wrong way (by the flag, or by the difference's sign)."""
    diff = m.get("diff")
    if isinstance(diff, int | float) and ((diff > 0) if _lower_is_better(metric) else (diff < 0)):
        return True
    return m.get("worse") is True


def _significant(m: dict[str, Any], alpha: float) -> tuple[bool, str]:
    p = m.get("p_value")
    if p is not None:
        return float(p) < alpha, f"p={float(p):.3g} {'<' if float(p) < alpha else '>='} alpha {alpha:g}"
    ci = m.get("ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci:
        low, high = float(ci[0]), float(ci[1])
        return not (low <= 0.0 <= high), f"no p-value; interval [{low:.3g}, {high:.3g}]"
    return bool(m.get("significant")), "no p-value or interval; the runner's flag"


def _no_regression(comparison: Any, alpha: float) -> GateResult:
    if not isinstance(comparison, dict) or not isinstance(comparison.get("metrics"), dict):
        return GateResult("no_regression", alpha, None, True, "no promoted version to compare against", False)
    against = comparison.get("against", "the promoted version")
    regressions: list[str] = []
    noise: list[str] = []
    for metric, m in sorted(comparison["metrics"].items()):
        if not isinstance(m, dict) or not _worse(metric, m):
            continue
        significant, why = _significant(m, alpha)
        (regressions if significant else noise).append(f"{metric} ({why})")
    if regressions:
        detail = f"significantly worse than {against}: {', '.join(regressions)}"
        return GateResult("no_regression", alpha, float(len(regressions)), False, detail)
    detail = f"nothing significantly worse than {against}"
    if noise:
        detail += f" (worse but within noise: {', '.join(noise)})"
    return GateResult("no_regression", alpha, 0.0, True, detail)
