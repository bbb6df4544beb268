"""loom eval end to end on the tiny random Mistral: two trained versions and the base side by side
on a golden set, through the agents layer, batched in one engine, results stored beside the
candidate without touching it, and a report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_engine, train_tiny_intent

from loom.agents.spec import Gates
from loom.engine import Engine
from loom.errors import LoomError
from loom.evals.evaluate import evaluate
from loom.evals.golden import import_golden
from loom.evals.metrics import Graded, compare, grade, summarize
from loom.evals.promotion import versions_table
from loom.evals.report import confusion, write_report
from loom.evals.run import Outcome
from loom.store import Store
from loom.store.importers import import_hf_dir

LABELS = ("A", "B", "C")
ROWS = [
    {"text": f"{w} {i}", "label": lab}
    for i in range(4)
    for w, lab in (("ask", "A"), ("buy", "B"), ("call", "C"))
]


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Store:
    """tiny@v1 with intent@v1 (promoted) and intent@v2 (a candidate), and a golden set."""
    root = tmp_path_factory.mktemp("evals")
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    store.set_default_base("tiny")
    for version, steps in (("v1", 1), ("v2", 2)):
        train_tiny_intent(
            store, ROWS, root, version=version, alias="current" if version == "v1" else None, max_steps=steps
        )
    golden = root / "golden.jsonl"
    golden.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"g{i}",
                    "input": {"text": r["text"]},
                    "expected": {"intent": r["label"]},
                    "category": r["label"],
                }
            )
            + "\n"
            for i, r in enumerate(ROWS)
        )
    )
    import_golden(store, golden, "intent-golden")
    return store


@pytest.fixture(scope="module")
def eval_engine(eval_store: Store) -> Iterator[Engine]:
    eng = tiny_engine(
        eval_store, max_batch_size=8, max_seq_len=256, kv_cache_mb=16, max_adapters=4, max_rank=8
    )
    yield eng
    eng.shutdown()


@pytest.fixture
def agent_map(tmp_path: Path) -> Path:
    path = tmp_path / "AGENT_MODEL_MAP.json"
    path.write_text(
        json.dumps({"agents": {"intent": {"adapter": "intent", "generation": {"max_tokens": 12}}}})
    )
    return path


def test_candidate_promoted_and_base_side_by_side_in_one_batched_run(
    eval_store: Store, eval_engine: Engine, agent_map: Path
) -> None:
    manifest_before = eval_store.backend.read_bytes("adapters/intent/intent/versions/v2/manifest.json")
    steps_before = eval_engine.stats()
    run = evaluate(
        "intent",
        engine=eval_engine,
        store=eval_store,
        candidates=["intent@v2"],
        map_path=agent_map,
        concurrency=8,
    )
    after = eval_engine.stats()
    assert run.variants == {"candidate": "intent@v2", "promoted": "intent@v1", "base": "tiny@v1"}
    # batched: more tokens came out than decode steps ran (rows of several variants per step)
    tokens = after["tokens_generated"] - steps_before["tokens_generated"]
    steps = after["steps"] - steps_before["steps"]
    assert tokens > steps > 0
    (body,) = run.bodies
    assert body["subject"] == "intent@v2" and body["golden"]["rows"] == len(ROWS)
    assert set(body["variants"]) == {"candidate", "promoted", "base"}
    answered = {label: {r["answers"][label]["adapter"] for r in body["rows"]} for label in body["variants"]}
    assert answered == {"candidate": {"intent@v2"}, "promoted": {"intent@v1"}, "base": {None}}
    # the stored numbers are the rows' grades: recompute accuracy from the raw answers
    for label, variant in body["variants"].items():
        right = []
        for row in body["rows"]:
            try:
                answer = json.loads(row["answers"][label]["raw"]).get("intent")
            except ValueError:
                answer = None
            right.append(float(answer == row["expected"]["intent"] and row["answers"][label]["valid"]))
        assert variant["metrics"]["accuracy"] == pytest.approx(sum(right) / len(right))
        assert set(variant["metrics"]["per_category"]) == set(LABELS)
    assert body["comparison"]["against"] == "intent@v1"
    acc = body["comparison"]["metrics"]["accuracy"]
    assert 0.0 <= acc["p_value"] <= 1.0 and acc["ci"][0] <= acc["diff"] <= acc["ci"][1]
    # stored beside the candidate; the version itself is untouched
    (rel,) = run.saved
    assert rel.startswith("adapters/intent/intent/versions/v2/evals/")
    stored = json.loads(eval_store.backend.read_bytes(rel))
    assert body["eval_id"] in json.dumps(stored)
    assert (
        eval_store.backend.read_bytes("adapters/intent/intent/versions/v2/manifest.json") == manifest_before
    )
    # recommended use cases: the categories the stored eval passes the gates in (v2), else the
    # base's size-based list (v1 has no eval)
    per = body["variants"]["candidate"]["metrics"]["per_category"]
    for bar in (0.0, 0.5, 1.0):
        gates = Gates(accuracy=bar, p95_latency_s=None)
        rows = {r["version"]: r["recommended_use_cases"] for r in versions_table(eval_store, "intent", gates)}
        assert rows["v2"] == sorted(c for c, m in per.items() if m["accuracy"] >= bar)
        assert "classification" in rows["v1"]


def test_the_promoted_version_given_as_a_candidate_is_still_the_comparison(
    eval_store: Store, eval_engine: Engine, agent_map: Path
) -> None:
    run = evaluate(
        "intent", engine=eval_engine, store=eval_store, candidates=["intent@v2", "intent@v1"],
        map_path=agent_map, limit=3, save=False,
    )  # fmt: skip
    v2, v1 = run.bodies
    assert v2["comparison"]["against"] == "intent@v1" and v2["variants"]["promoted"]["ref"] == "intent@v1"
    assert "comparison" not in v1  # the promoted version is not compared with itself


def test_the_report_is_written_as_markdown_and_self_contained_html(
    eval_store: Store, eval_engine: Engine, agent_map: Path, tmp_path: Path
) -> None:
    run = evaluate(
        "intent",
        engine=eval_engine,
        store=eval_store,
        candidates=["intent@v2"],
        map_path=agent_map,
        limit=6,
        save=False,
    )
    assert run.saved == [] and run.bodies[0]["golden"]["rows"] == 6
    md, page = write_report(run.bodies, tmp_path / "report")
    text = page.read_text()
    assert "<svg" in text and "<script" not in text and "src=" not in text  # nothing to fetch
    assert "intent@v2" in md.read_text() and "gold \\ predicted" in text


def test_a_golden_row_that_does_not_fit_the_agent_is_refused_before_any_model_runs(
    eval_store: Store, eval_engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "AGENT_MODEL_MAP.json"
    path.write_text(
        json.dumps(
            {"agents": {"intent": {"adapter": "intent", "input": {"type": "object", "required": ["query"]}}}}
        )
    )
    steps = eval_engine.stats()["steps"]
    with pytest.raises(LoomError, match=r"golden row g0 input.*query"):
        evaluate("intent", engine=eval_engine, store=eval_store, map_path=path)
    assert eval_engine.stats()["steps"] == steps
    with pytest.raises(LoomError, match="intent@v9"):
        evaluate("intent", engine=eval_engine, store=eval_store, map_path=path, candidates=["intent@v9"])


# ------------------------------------------------------------------ grading on hand-made answers
def _row(**kw: Any) -> Any:
    from loom.evals.golden import GoldenRow

    return GoldenRow(**{"id": "r", "input": {"q": "x"}, **kw})


def test_grades_on_hand_made_answers() -> None:
    ok = Outcome({"intent": "A"}, '{"intent": "A"}', None, 0.2)
    bad = Outcome(None, "", "every step failed", 0.3)
    row = _row(expected={"intent": "A"})
    assert grade(row, ok, "auto", []).score == 1.0
    assert grade(row, bad, "auto", []).score == 0.0 and not grade(row, bad, "auto", []).valid
    cited = _row(expected=["Paris"], citation=["squad:a"])
    g = grade(cited, Outcome("Paris", "Paris <<SRC:squad:a>>", None, 0.1, ["squad:a"]), "exact", [])
    assert (g.score, g.cited, g.cited_right) == (1.0, True, True)
    g = grade(
        cited, Outcome("Paris", "Paris <<SRC:squad:b>>", None, 0.1, ["squad:a", "squad:b"]), "exact", []
    )
    assert (g.cited, g.cited_right) == (True, False)
    dynamic = _row(type="DYNAMIC")
    assert grade(
        dynamic, Outcome("I don't know", "I don't know", None, 0.1), "exact", ["i don't know"]
    ).refused
    assert not grade(dynamic, Outcome("Paris", "Paris", None, 0.1), "exact", ["i don't know"]).refused
    # low confidence for a missing citation is not a refusal: the answer still answers
    assert not grade(dynamic, Outcome("Paris", "Paris", None, 0.1, low_confidence=True), "exact", []).refused


def _g(score: float | None, valid: bool = True, cat: str = "c", latency: float = 0.1) -> Graded:
    return Graded(valid, score, None, None, None, latency, cat)


def test_summaries_and_the_paired_comparison_on_hand_computed_examples() -> None:
    grades = [
        _g(1.0, cat="a"),
        _g(0.0, cat="a"),
        _g(1.0, cat="b"),
        _g(None, valid=False, cat="b", latency=0.5),
    ]
    m = summarize(grades)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["schema_validity"] == 0.75
    assert m["citation_presence"] is None and m["refusal_accuracy"] is None
    assert m["per_category"]["a"]["accuracy"] == 0.5 and m["per_category"]["b"]["n"] == 2
    # 20 rows: the promoted version right on all, the candidate wrong on 9 of them.
    promoted = [_g(1.0) for _ in range(20)]
    candidate = [_g(0.0) for _ in range(9)] + [_g(1.0) for _ in range(11)]
    acc = compare(promoted, candidate, alpha=0.05)["accuracy"]
    # McNemar exact: 9 discordant pairs all one way -> p = 2 * 0.5**9 = 0.00390625
    assert acc["p_value"] == pytest.approx(2 * 0.5**9) and acc["discordant"] == [0, 9]
    assert acc["diff"] == pytest.approx(-9 / 20) and acc["verdict"] == "worse" and acc["worse"]
    # one row apart out of 20 is noise
    close = [_g(0.0)] + [_g(1.0) for _ in range(19)]
    acc = compare(promoted, close, alpha=0.05)["accuracy"]
    assert acc["p_value"] == 1.0 and acc["verdict"] == "no significant difference"
    # partial credit (token F1): a uniform drop from 0.9 to 0.6 has no right/wrong flip at 0.5,
    # but every one of 20 paired differences is negative: the sign-flip test sees it
    acc = compare([_g(0.9) for _ in range(20)], [_g(0.6) for _ in range(20)], alpha=0.05)["accuracy"]
    assert acc["test"] == "sign-flip permutation" and acc["discordant"] == [0, 0]
    assert acc["p_value"] < 0.001 and acc["verdict"] == "worse"
    # and small jitter both ways is noise
    jitter = [_g(0.9 + (0.02 if i % 2 else -0.02)) for i in range(20)]
    assert compare([_g(0.9) for _ in range(20)], jitter, alpha=0.05)["accuracy"]["verdict"] == (
        "no significant difference"
    )


def test_the_confusion_matrix_counts_gold_against_predicted() -> None:
    body = {
        "rows": [
            {"expected": {"intent": "A"}, "answers": {"candidate": {"raw": '{"intent": "A"}'}}},
            {"expected": {"intent": "A"}, "answers": {"candidate": {"raw": '{"intent": "B"}'}}},
            {"expected": {"intent": "B"}, "answers": {"candidate": {"raw": "not json"}}},
        ]
    }
    found = confusion(body)
    assert found is not None
    labels, cells = found
    assert cells == {("A", "A"): 1, ("A", "B"): 1, ("B", "(invalid)"): 1}
    assert labels == ["(invalid)", "A", "B"]
