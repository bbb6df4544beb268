"""Golden sets: row validation with file:line errors, import into a real store and back,
refusing a non-golden dataset, the CLI, and the example golden sets built from the shared data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loom.agents.examples import default_data_dir
from loom.cli.main import app
from loom.data.snapshot import snapshot
from loom.errors import IntegrityError, LoomError
from loom.evals.examples import UNANSWERABLE, build_example_golden, qa_cited_golden
from loom.evals.golden import GOLDEN_FILE, GoldenFileError, import_golden, load_golden, read_golden
from loom.evals.scorers import normalize_answer, score_row
from loom.store import Store
from loom.store.verify import verify_store

runner = CliRunner()
DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "squad_qa" / "dev.jsonl").is_file(), reason="shared data absent")

GOOD = [
    {
        "id": "q1",
        "input": {"text": "play jazz"},
        "expected": {"intent": "PlayMusic"},
        "category": "PlayMusic",
    },
    {"input": {"question": "capital?"}, "expected": "Paris", "citation": "squad:France#p1"},
    {"id": 7, "input": {"question": "who won in 2090?"}, "type": "dynamic", "category": "unanswerable"},
]


def write(path: Path, rows: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def loom(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


# ------------------------------------------------------------------ reading
def test_good_rows_are_normalised_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "g.jsonl", [GOOD[0], "", "   ", GOOD[1], GOOD[2]])
    rows = read_golden(path)
    assert [r.id for r in rows] == ["q1", "g.jsonl:4", "7"]  # no id: file:line (blank lines counted)
    assert rows[1].expected == ["Paris"] and rows[1].citation == ["squad:France#p1"]
    assert rows[1].type == "STATIC" and rows[1].category == "all"
    assert rows[2].type == "DYNAMIC" and rows[2].expected is None


def test_every_bad_row_is_reported_with_file_line_field_and_fix(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.jsonl",
        [
            GOOD[0],
            '{"input": {"text": "x"}, "expected": ["a"',  # 2: broken JSON
            '["not", "an", "object"]',  # 3
            {"input": {"text": "x"}, "expected": ["a"], "answer": "a"},  # 4: unknown field
            {"expected": ["a"]},  # 5: no input
            {"input": {"text": "x"}, "expected": ["a"], "type": "MAYBE"},  # 6
            {"input": {"text": "x"}},  # 7: STATIC with nothing expected
            {"input": {"text": "x"}, "expected": [1, 2]},  # 8
            {"id": "q1", "input": {"text": "y"}, "expected": ["b"]},  # 9: duplicate id
            {"input": {"text": "x"}, "expected": ["a"], "citation": []},  # 10
        ],
    )
    with pytest.raises(GoldenFileError) as err:
        read_golden(path)
    problems = err.value.problems
    where = {int(p.split(":")[1]): p for p in problems}
    assert sorted(where) == [2, 3, 4, 5, 6, 7, 8, 9, 10], problems
    assert "invalid JSON" in where[2] and "one JSON object per line" in where[2]
    assert f"{path}:3: row: a JSON list, not an object" in where[3]
    assert f"{path}:4: answer: unknown field; remove it" in where[4]
    assert f"{path}:5: input: missing; give the agent's payload" in where[5]
    assert f"{path}:6: type:" in where[6] and '"DYNAMIC"' in where[6]
    assert (
        where[7] == f"{path}:7: expected: a STATIC row needs expected answers; add them, or mark it DYNAMIC"
    )
    assert f"{path}:8: expected: must be a non-empty list of strings;" in where[8]
    assert f"{path}:9: id: duplicate 'q1' (first on line 1)" in where[9]
    assert f"{path}:10: citation:" in where[10]
    assert str(err.value).startswith(f"{path}: 9 bad rows:")  # the message lists them all
    assert all(p in str(err.value) for p in problems)


def test_one_bad_row_is_one_line_and_empty_or_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match=r"bad\.jsonl:2: input: missing;"):
        read_golden(write(tmp_path / "bad.jsonl", [GOOD[0], {"expected": ["a"]}]))
    with pytest.raises(LoomError, match="no rows"):
        read_golden(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(LoomError, match="no such golden file"):
        read_golden(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------ the store
def test_import_round_trip(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path / "g.jsonl", GOOD)
    m = import_golden(store, path, "demo-golden", version="v1")
    assert m.kind == "dataset" and m.tags == ["golden"] and {f.path for f in m.files} >= {GOLDEN_FILE}
    facts = m.dataset or {}
    assert facts["golden"] == {
        "rows": 3,
        "categories": {"PlayMusic": 1, "all": 1, "unanswerable": 1},
        "types": {"STATIC": 2, "DYNAMIC": 1},
        "with_citation": 1,
    }
    assert facts["rows"] == 3 and facts["rows_per_label"] == facts["golden"]["categories"]
    assert store.resolve("demo-golden").version == "v1"  # alias current
    golden = load_golden(store, "demo-golden")
    assert golden.ref == "demo-golden@v1" and golden.sha256 == facts["content_sha256"]
    assert golden.rows == read_golden(path)
    # the same rows again: the stored version, not a duplicate; new rows: a new version
    assert import_golden(store, path, "demo-golden").version == "v1"
    m2 = import_golden(store, write(tmp_path / "g2.jsonl", GOOD[:2]), "demo-golden", version="v2")
    assert load_golden(store, "demo-golden@v2").sha256 != golden.sha256
    assert store.resolve("demo-golden").version == m2.version
    # importing the first rows again points current back at them (loom eval then uses them)
    assert import_golden(store, path, "demo-golden").version == "v1"
    assert store.resolve("demo-golden").version == "v1"
    assert all(r.ok for r in verify_store(store))


def test_load_refuses_a_dataset_that_is_not_golden_and_a_damaged_copy(store: Store, tmp_path: Path) -> None:
    plain = write(tmp_path / "train.jsonl", [{"text": "hello", "label": "a"}])
    snapshot(store, [plain], name="train-data")
    with pytest.raises(LoomError, match=r"train-data@\S+ is a dataset snapshot, not a golden set; import"):
        load_golden(store, "train-data")
    m = import_golden(store, write(tmp_path / "g.jsonl", GOOD), "demo-golden")
    stored = store.backend.local_path(f"{store.resolve('demo-golden').rel}/{GOLDEN_FILE}")
    assert stored is not None and m.version
    stored.chmod(0o644)
    stored.write_text(stored.read_text().replace("Paris", "Lyon!"))
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        load_golden(store, "demo-golden")


def test_cli_import_ls_show(store: Store, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", [GOOD[0], {"input": {}, "expected": ["a"]}, {"expected": ["a"]}])
    out = " ".join(loom("golden", "import", str(bad), "--name", "demo-golden", code=2).split())  # unwrapped
    assert "bad.jsonl: 2 bad rows" in out and "bad.jsonl:2: input: is an empty object" in out
    assert "bad.jsonl:3: input: missing" in out
    good = write(tmp_path / "g.jsonl", GOOD)
    out = " ".join(loom("golden", "import", str(good), "--name", "demo-golden").split())
    assert "demo-golden@" in out and "3 rows (2 STATIC, 1 DYNAMIC)" in out
    listed = json.loads(loom("golden", "ls", "--json"))
    assert [(g["rows"], g["types"]["DYNAMIC"]) for g in listed] == [(3, 1)]
    shown = json.loads(loom("golden", "show", "demo-golden", "--rows", "2", "--json"))
    assert shown["rows"] == 3 and [r["id"] for r in shown["rows_shown"]] == ["q1", "g.jsonl:2"]
    assert "PlayMusic" in loom("golden", "show", "demo-golden")


# ------------------------------------------------------------------ the example golden sets
@needs_data
def test_example_golden_sets_from_the_dev_splits(tmp_path: Path) -> None:
    paths = {name: build_example_golden(name, DATA, tmp_path) for name in ("intent", "qa_cited", "re_ranker")}
    intent = read_golden(paths["intent"])
    assert len(intent) == 300 and {r.category for r in intent} == {
        "AddToPlaylist",
        "BookRestaurant",
        "GetWeather",
        "PlayMusic",
        "RateBook",
        "SearchScreeningEvent",
    }
    assert all(r.expected == {"intent": r.category} and list(r.input) == ["text"] for r in intent)

    qa = read_golden(paths["qa_cited"])
    static = [r for r in qa if r.type == "STATIC"]
    dynamic = [r for r in qa if r.type == "DYNAMIC"]
    assert len(static) == 300 and len(dynamic) == UNANSWERABLE
    assert all(r.citation == [f"squad:{r.input['passage_id']}"] for r in static)
    assert all(r.input["passage_id"].startswith(r.category + "#") for r in static)
    by_id = {r.id: r for r in static}
    for r in dynamic:
        source = by_id[r.id.removeprefix("unanswerable-")]
        assert r.category == "unanswerable" and r.citation is None and r.expected is None
        assert r.input["question"] == source.input["question"]
        assert r.input["passage_id"].split("#")[0] != source.category  # another article
        context = normalize_answer(r.input["context"])
        assert not any(f" {normalize_answer(a)} " in f" {context} " for a in source.expected or [])

    ranker = read_golden(paths["re_ranker"])
    assert len(ranker) == 300 and {r.category for r in ranker} == {r.category for r in static}
    for r in ranker[:50]:  # the gold ranking scores 1 under "auto" (json on the dotted path), another 0
        first = r.expected["ranking.0"]  # type: ignore[index]
        wrong = next(n for n in "1234" if n != first)
        assert f"[{first}]" in r.input["candidates"]
        assert score_row(r, {"ranking": [first, wrong]}, "", "auto") == 1.0
        assert score_row(r, {"ranking": [wrong, first]}, "", "auto") == 0.0

    again = {name: build_example_golden(name, DATA, tmp_path / "again") for name in paths}
    assert all(paths[n].read_bytes() == again[n].read_bytes() for n in paths)  # deterministic


def squad(qid: str, pid: str, context: str, answer: str) -> dict[str, Any]:
    title = pid.split("#")[0]
    return {
        "id": qid,
        "title": title,
        "passage_id": pid,
        "context": context,
        "question": "?",
        "answers": [answer],
    }


def test_unanswerable_rows_pair_a_passage_that_cannot_answer() -> None:
    mentions = [squad(f"b{i}", f"B#p{i}", f"The moon is here ({i}).", "sun") for i in range(10)]
    rows = [
        squad("a1", "A#p0", "All about the moon.", "moon"),
        *mentions,
        squad("b10", "B#p10", "Nothing.", "sun"),
    ]
    dynamic = {r.id: r for r in qa_cited_golden(rows) if r.type == "DYNAMIC"}
    assert len(dynamic) == len(rows)  # fewer questions than UNANSWERABLE: one each
    assert dynamic["unanswerable-a1"].input["passage_id"] == "B#p10"  # the only one not saying "moon"
    with pytest.raises(LoomError, match="a1: every other passage mentions one of its answers"):
        qa_cited_golden(rows[:-1])


@needs_data
def test_cli_build_examples_and_import(store: Store, tmp_path: Path) -> None:
    out = json.loads(
        loom("golden", "build-examples", "--agent", "intent", "--out", str(tmp_path), "--import", "--json")
    )
    assert out[0]["rows"] == 300 and out[0]["ref"].startswith("intent-golden@")
    golden = load_golden(store, "intent-golden")
    assert len(golden.rows) == 300 and golden.rows == read_golden(tmp_path / "intent.jsonl")
    loom("golden", "build-examples", "--agent", "nope", "--out", str(tmp_path), code=2)
