"""Scorers and paired statistics on hand-computed examples (no model, no store)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loom.errors import LoomError
from loom.evals.golden import GoldenRow
from loom.evals.scorers import check_scorer, is_refusal, normalize_answer, score_row, token_f1
from loom.evals.stats import bootstrap_diff, mcnemar, percentile


def row(expected: Any = None, **kw: Any) -> GoldenRow:
    return GoldenRow(id="r", input={"text": "x"}, expected=expected, **kw)


# ------------------------------------------------------------------ text scorers
def test_normalize_answer_and_token_f1() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    # pred {cat, sat} vs gold {cat, sat, down}: P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("Cat.", "the cat") == 1.0


def test_exact_contains_f1_take_the_best_reference() -> None:
    paris = row(["Paris", "City of Paris"])
    assert score_row(paris, "the Paris.", "", "exact") == 1.0
    assert score_row(paris, "Paris, France", "", "exact") == 0.0
    assert score_row(paris, "It is Paris, France", "", "contains") == 1.0
    assert score_row(paris, "Parisian cafes", "", "contains") == 0.0  # word boundaries
    assert score_row(row(["10"]), "100 people", "", "contains") == 0.0
    assert score_row(paris, "Lyon", "", "auto") == 0.0 and score_row(paris, "paris", "", "auto") == 1.0
    # vs "Denver Broncos": P = 2/3, R = 1 -> 0.8; vs "Broncos": P = 1/3, R = 1 -> 0.5; best 0.8
    broncos = row(["Denver Broncos", "Broncos"])
    assert score_row(broncos, "the Denver Broncos team", "", "f1") == pytest.approx(0.8)
    # a non-string output (a JSON agent's dict) is graded on the raw text
    assert score_row(paris, {"answer": "Paris"}, "Paris", "exact") == 1.0


# ------------------------------------------------------------------ JSON scorer
def test_json_fields_share_paths_and_scalars() -> None:
    two = row({"intent": "PlayMusic", "slots.artist": "Miles"})
    assert score_row(two, {"intent": "PlayMusic", "slots": {"artist": "Davis"}}, "", "json") == 0.5
    assert score_row(two, {"intent": "PlayMusic", "slots": {"artist": "Davis"}}, "", "exact") == 0.0
    raw = '{"intent": "PlayMusic", "slots": {"artist": "Miles"}}'
    assert score_row(two, None, raw, "auto") == 1.0  # parsed from raw when output is not JSON
    assert score_row(two, None, "PlayMusic", "json") == 0.0  # not JSON at all
    top1 = row({"ranking.0": "2"})
    assert score_row(top1, {"ranking": [2, 1, 3, 4]}, "", "json") == 1.0  # 2 and "2" agree
    assert score_row(top1, {"ranking": ["1", "2"]}, "", "json") == 0.0
    assert score_row(top1, {"ranking": []}, "", "json") == 0.0
    assert score_row(row({"ok": True}), {"ok": "True"}, "", "json") == 0.0  # a bool is not a string
    assert score_row(row({"ok": True}), {"ok": 1}, "", "json") == 0.0
    assert score_row(row({"a.b": 1}), {"a.b": 1}, "", "json") == 1.0  # a literal dotted key


def test_scorer_and_expected_kind_mismatch_is_a_clear_error() -> None:
    with pytest.raises(LoomError, match="expects JSON fields; use --scorer json"):
        score_row(row({"intent": "A"}), {"intent": "A"}, "", "f1")
    with pytest.raises(LoomError, match="expects answer strings; use --scorer exact"):
        score_row(row(["A"]), "A", "", "json")


# ------------------------------------------------------------------ refusals
def test_dynamic_rows_score_refusals() -> None:
    dynamic = row(type="DYNAMIC")
    assert score_row(dynamic, "", "I'm not sure; the passage does not say.", "exact") == 1.0
    assert score_row(dynamic, "", "I\u2019m NOT sure", "f1") == 1.0  # typographic apostrophe
    assert score_row(dynamic, "1998", "1998 <<SRC:squad:Rhine#p3>>", "auto") == 0.0
    assert score_row(dynamic, "", "No idea.", "exact", hedges=["no idea"]) == 1.0
    assert score_row(dynamic, "", "It might be 1998", "exact", hedges=["no idea"]) == 0.0
    assert is_refusal("This question is unanswerable from the passage", [])
    assert not is_refusal("The Rhine", ["i don't know"])


# ------------------------------------------------------------------ module:function
def test_custom_scorer_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "golden_scorers_mod.py").write_text(
        "def length(row, output, raw):\n    return len(raw) == 3\n"
        "def quarter(row, output, raw):\n    return 0.25\n"
        "def too_big(row, output, raw):\n    return 2\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = row(["x"])
    assert score_row(r, None, "abc", "golden_scorers_mod:length") == 1.0
    assert score_row(r, None, "abcd", "golden_scorers_mod:length") == 0.0
    assert score_row(row(type="DYNAMIC"), None, "", "golden_scorers_mod:quarter") == 0.25  # every row
    with pytest.raises(LoomError, match=r"returned 2 for golden row 'r'; it must return a bool or a number"):
        score_row(r, None, "", "golden_scorers_mod:too_big")
    with pytest.raises(LoomError, match="has a non-callable 'NOT_CALLABLE'"):
        check_scorer("golden_scorers_mod:NOT_CALLABLE")
    with pytest.raises(LoomError, match="has no attribute 'absent'; give a function"):
        check_scorer("golden_scorers_mod:absent")
    with pytest.raises(LoomError, match=r"cannot import module 'no_such_module_xyz'.*PYTHONPATH"):
        check_scorer("no_such_module_xyz:fn")
    with pytest.raises(LoomError, match="unknown; use one of exact, contains, f1, json, auto or an entry"):
        score_row(r, None, "", "bleu")
    check_scorer("auto")
    sys.modules.pop("golden_scorers_mod", None)


# ------------------------------------------------------------------ McNemar
def pairs(b01: int, b10: int, both_right: int = 20, both_wrong: int = 5) -> tuple[list[bool], list[bool]]:
    a = [False] * b01 + [True] * b10 + [True] * both_right + [False] * both_wrong
    b = [True] * b01 + [False] * b10 + [True] * both_right + [False] * both_wrong
    return a, b


@pytest.mark.parametrize(
    ("b01", "b10", "p"),
    [
        (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024 = 0.021484375
        (9, 1, 22 / 1024),  # symmetric
        (0, 6, 2 / 64),  # 2 * C(6,0) / 2^6 = 0.03125
        (1, 4, 12 / 32),  # 2 * (1 + 5) / 2^5 = 0.375
        (5, 5, 1.0),  # 2 * (1+10+45+120+210+252) / 1024 = 1.246 -> capped at 1
        (0, 0, 1.0),  # no discordant rows: nothing to test
    ],
)
def test_mcnemar_exact_two_sided(b01: int, b10: int, p: float) -> None:
    result = mcnemar(*pairs(b01, b10))
    assert (result.b01, result.b10, result.discordant) == (b01, b10, b01 + b10)
    assert result.p_value == pytest.approx(p, rel=1e-12)


def test_mcnemar_large_counts_and_bad_input() -> None:
    assert mcnemar(*pairs(0, 1100)).p_value == pytest.approx(0.0, abs=1e-300)  # no float overflow
    # normal approximation with continuity correction: z = 39 / sqrt(1240) = 1.1075, p = 0.268
    assert mcnemar(*pairs(600, 640)).p_value == pytest.approx(0.268, abs=0.001)
    with pytest.raises(ValueError, match="same rows"):
        mcnemar([True], [True, False])


# ------------------------------------------------------------------ percentile and bootstrap
def test_percentile_is_numpys_linear_rule() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5  # position 1.5 between 2 and 3
    assert percentile(list(range(1, 11)), 95) == pytest.approx(9.55)  # position 8.55: 9 + 0.55
    assert percentile([1, 10], 0) == 1 and percentile([1, 10], 100) == 10 and percentile([7], 42) == 7
    values = np.random.default_rng(3).exponential(size=101).tolist()
    for q in (0, 1, 5, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_bootstrap_contains_the_true_difference() -> None:
    rng = np.random.default_rng(0)
    skill = rng.random(2000)
    a = (skill < 0.70).astype(float).tolist()  # accuracy 0.7
    b = (skill < 0.80).astype(float).tolist()  # the same rows plus 10 points more: true diff 0.10
    diff, low, high = bootstrap_diff(a, b, seed=1)
    assert diff == pytest.approx(np.mean(b) - np.mean(a))
    assert low < 0.10 < high and low < diff < high and high - low < 0.05
    # independent noise on the same rows: still covers the truth, and a wider interval
    noisy = (rng.random(2000) < 0.8).astype(float).tolist()
    _d, low2, high2 = bootstrap_diff(a, noisy, seed=1)
    assert low2 < 0.10 < high2 and high2 - low2 > high - low


def test_bootstrap_degenerate_small_and_deterministic() -> None:
    same = [1.0, 0.0, 1.0, 1.0]
    assert bootstrap_diff(same, same) == (0.0, 0.0, 0.0)
    assert bootstrap_diff([0.0, 0.0], [1.0, 1.0]) == (1.0, 1.0, 1.0)
    # diffs [0, 1]: resampled means are 0, 0.5 or 1 with odds 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1
    assert bootstrap_diff([0.0, 0.0], [0.0, 1.0]) == (0.5, 0.0, 1.0)
    a = [float(i % 3 == 0) for i in range(100)]
    b = [float(i % 4 != 0) for i in range(100)]
    assert bootstrap_diff(a, b, seed=7) == bootstrap_diff(a, b, seed=7)
    assert bootstrap_diff(a, b, seed=7) != bootstrap_diff(a, b, seed=8)
    assert bootstrap_diff(a, b, resamples=300, seed=7) != bootstrap_diff(a, b, resamples=2000, seed=7)
    with pytest.raises(ValueError, match="same rows"):
        bootstrap_diff([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        bootstrap_diff([], [])
