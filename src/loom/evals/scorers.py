"""Grading one agent answer against one golden row: a score in [0, 1].

Scorers (``score_row(..., scorer=)``):

- ``exact``: the answer equals one of the expected strings after SQuAD normalisation
  (an expected JSON object: every field matches);
- ``contains``: one of the expected strings occurs in the answer, on word boundaries;
- ``f1``: SQuAD token F1, best over the expected strings;
- ``json``: the share of expected fields the JSON answer matches. A field name with dots
  is a path into the answer (``{"ranking.0": "2"}``: the first item of ``ranking`` is "2")
  unless the answer has that literal key;
- ``auto``: ``json`` when the row expects JSON fields, else ``exact``;
- ``module:function``: ``function(row, output, raw) -> float | bool``, called for every row.

A DYNAMIC row (the agent must defer or refuse) scores 1 when the answer is a refusal
(``is_refusal``) under every built-in scorer; a ``module:function`` scorer grades it itself.
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import math
import re
import string
from collections.abc import Callable
from typing import Any

from loom.agents.spec import DEFAULT_HEDGES
from loom.errors import LoomError
from loom.evals.golden import GoldenRow

BUILTIN_SCORERS = ("exact", "contains", "f1", "json", "auto")
# Said by a model that declines rather than hedges; counted as refusals with the agent's hedges.
REFUSAL_PHRASES = (
    "cannot answer",
    "can't answer",
    "unable to answer",
    "not enough information",
    "does not say",
    "doesn't say",
    "does not mention",
    "doesn't mention",
    "not mentioned",
    "unanswerable",
    "no answer",
)
_PUNCTUATION = frozenset(string.punctuation)
_MISSING = object()

CustomScorer = Callable[[GoldenRow, Any, str], Any]


# ------------------------------------------------------------------ text answers
def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD v1.1 token F1 between two answers (bags of normalised tokens)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def contains_answer(answer: str, expected: str) -> bool:
    """``expected`` occurs in ``answer`` after normalisation, on word boundaries (padded with
    spaces, so "10" is not found in "100")."""
    needle = normalize_answer(expected)
    return bool(needle) and f" {needle} " in f" {normalize_answer(answer)} "


def is_refusal(raw: str, hedges: list[str]) -> bool:
    """Whether ``raw`` declines or defers: it contains one of ``hedges`` or a refusal phrase
    (case-insensitive; typographic apostrophes count as plain ones)."""
    text = raw.lower().replace("\u2019", "'")
    phrases = [h.lower().replace("\u2019", "'") for h in hedges] + list(REFUSAL_PHRASES)
    return any(p and p in text for p in phrases)


# ------------------------------------------------------------------ JSON answers
def _as_json(output: Any, raw: str) -> Any:
    if isinstance(output, (dict, list)):
        return output
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _lookup(value: Any, field: str) -> Any:
    """``value[field]``, or the dotted path ``a.0.b`` when there is no literal key ``field``."""
    if isinstance(value, dict) and field in value:
        return value[field]
    for part in field.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _same(got: Any, want: Any) -> bool:
    """Equal, or the same scalar written as a number in one and a string in the other
    (a ranking of ["2", ...] and one of [2, ...] agree)."""
    if isinstance(got, bool) or isinstance(want, bool):  # True is not 1, nor "True"
        return type(got) is type(want) and got == want
    if got == want:
        return True
    scalars = (str, int, float)
    return isinstance(got, scalars) and isinstance(want, scalars) and str(got).strip() == str(want).strip()


def json_fields(expected: dict[str, Any], output: Any, raw: str) -> float:
    """The share of ``expected``'s fields that the answer matches (0 when it is not JSON)."""
    value = _as_json(output, raw)
    if value is None or not expected:
        return 0.0
    hits = sum(_same(_lookup(value, k), v) for k, v in expected.items())
    return hits / len(expected)


# ------------------------------------------------------------------ scoring
def check_scorer(scorer: str) -> None:
    """Raise a LoomError now for an unknown scorer or an entry point that does not load
    (call it before a long run rather than failing on its first row)."""
    if scorer not in BUILTIN_SCORERS:
        _custom(scorer)


@functools.lru_cache(maxsize=32)
def _custom(scorer: str) -> CustomScorer:
    module_name, _, attr = scorer.partition(":")
    if not module_name or not attr:
        raise LoomError(
            f"scorer {scorer!r}: unknown; use one of {', '.join(BUILTIN_SCORERS)} "
            f"or an entry point module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoomError(
            f"scorer {scorer!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            f"check the module name and that it is on PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        problem = "has no attribute" if fn is None else "has a non-callable"
        raise LoomError(
            f"scorer {scorer!r}: module {module_name!r} {problem} {attr!r}; "
            f"give a function taking (row, output, raw) and returning a float or bool"
        )
    return fn


def _custom_score(scorer: str, row: GoldenRow, output: Any, raw: str) -> float:
    value = _custom(scorer)(row, output, raw)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return float(value)
    raise LoomError(
        f"scorer {scorer!r} returned {value!r} for golden row {row.id!r}; "
        f"it must return a bool or a number in [0, 1]"
    )


def _text(output: Any, raw: str) -> str:
    return output if isinstance(output, str) else raw


def score_row(
    row: GoldenRow, output: Any, raw: str, scorer: str, *, hedges: list[str] | None = None
) -> float:
    """Grade one answer: ``output`` is what the agent parsed (a dict for JSON agents, the text
    without citation markers for text agents), ``raw`` the generated text. ``hedges`` (the
    agent's, default the built-in list) decide refusals on DYNAMIC rows."""
    if scorer not in BUILTIN_SCORERS:
        return _custom_score(scorer, row, output, raw)
    if row.type == "DYNAMIC":
        return float(is_refusal(raw, DEFAULT_HEDGES if hedges is None else hedges))
    expected = row.expected
    if scorer == "auto":
        scorer = "json" if isinstance(expected, dict) else "exact"
    if isinstance(expected, dict):
        if scorer == "json":
            return json_fields(expected, output, raw)
        if scorer == "exact":
            return float(json_fields(expected, output, raw) == 1.0)
        raise LoomError(
            f"golden row {row.id!r}: scorer {scorer!r} compares answer strings but the row "
            f"expects JSON fields; use --scorer json (or auto)"
        )
    if not expected:
        raise LoomError(
            f"golden row {row.id!r}: STATIC but nothing expected; add expected answers or mark it DYNAMIC"
        )
    if scorer == "json":
        raise LoomError(
            f"golden row {row.id!r}: scorer 'json' needs expected JSON fields but the row expects "
            f"answer strings; use --scorer exact, contains or f1"
        )
    answer = _text(output, raw)
    if scorer == "exact":
        return float(any(normalize_answer(answer) == normalize_answer(e) for e in expected))
    if scorer == "contains":
        return float(any(contains_answer(answer, e) for e in expected))
    return max(token_f1(answer, e) for e in expected)
