"""Citation markers (parse, strip, render), the source registry (JSON and SQLite files,
unknown ids persisted and counted) and ``loom sources`` through Typer's runner."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from loom.agents.citations import (
    Citation,
    format_marker,
    parse_citations,
    render_list,
    render_markdown,
    split_source_id,
    strip_citations,
    unique_citations,
)
from loom.agents.sources import SourceRegistry, build_squad_registry, squad_source
from loom.cli.main import app
from loom.errors import LoomError

SQUAD = Path("/work/shared/data/squad_qa")
runner = CliRunner()
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strategies ----------------------------------------------------------------------


def _id_char(c: str) -> bool:
    return not c.isspace() and c not in "<>" and not ("\x00" <= c <= "\x1f" or c == "\x7f")


domains = st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)
entity_ids = st.one_of(
    st.from_regex(r"[A-Za-z_(),]{1,20}#p[0-9]{1,3}", fullmatch=True),
    st.text(st.characters(exclude_categories=["Cs"]).filter(_id_char), min_size=1, max_size=40),
)
markers = st.builds(format_marker, domains, entity_ids)
# Pieces that make well-formed, malformed, nested and unclosed markers when shuffled together.
fragments = st.sampled_from(
    ["<<SRC:", "<<", ">>", "<", ">", "SRC", ":", " ", "\t", "\n", "squad", "Huguenot#p3", "é", "x", "-"]
)
markerish = st.one_of(st.lists(fragments | markers, max_size=30).map("".join), st.text(max_size=200))
plain_text = st.text(max_size=100).filter(lambda text: not parse_citations(text))


# --- properties ----------------------------------------------------------------------


@fast
@given(markerish)
def test_parse_never_raises_and_each_span_round_trips(text: str) -> None:
    cites = parse_citations(text)
    prev_end = 0
    for c in cites:
        assert prev_end <= c.start < c.end <= len(text)
        prev_end = c.end
        span = text[c.start : c.end]
        assert parse_citations(span) == [Citation(c.domain, c.entity_id, 0, len(span))]
        assert split_source_id(c.source_id) == (c.domain, c.entity_id)


@fast
@given(markerish)
def test_strip_leaves_no_marker(text: str) -> None:
    assert parse_citations(strip_citations(text)) == []


@fast
@given(plain_text, plain_text, domains, entity_ids)
def test_marker_inserted_into_plain_text_is_found_exactly(
    before: str, after: str, domain: str, entity_id: str
) -> None:
    marker = format_marker(domain, entity_id)
    text = before + marker + after
    assert parse_citations(text) == [Citation(domain, entity_id, len(before), len(before) + len(marker))]
    assert parse_citations(strip_citations(text)) == []


@settings(max_examples=20, deadline=None)
@given(markerish.filter(bool), st.integers(1_000, 50_000))
def test_parse_survives_huge_repeated_text(unit: str, times: int) -> None:
    text = (unit * times)[:1_000_000]
    parse_citations(text)
    assert parse_citations(strip_citations(text)) == []


# --- examples ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<<SRC:>>",
        "<<SRC:squad>>",
        "<<SRC:squad:>>",
        "<<SRC::x>>",
        "see <<SRC:squad:x",
        "<<SRC:squad:x y>>",
        "<<SRC:squad:x\n>>",
        "<<src:squad:x>>",
        "<<SRC:Squad:x>>",
        "<< SRC:squad:x>>",
        "stray >> and << alone",
        "<<SRC:squad:" + "x" * 257 + ">>",
    ],
)
def test_malformed_markers_are_plain_text(text: str) -> None:
    assert parse_citations(text) == []
    assert strip_citations(text) == text


def test_well_formed_edge_cases() -> None:
    (c,) = parse_citations("a <<SRC:squad:Huguenot#p3>> b")
    assert (c.source_id, c.start, c.end) == ("squad:Huguenot#p3", 2, 27)
    assert parse_citations("<<SRC: squad : Jacksonville,_Florida#p1 >>")[0].source_id == (
        "squad:Jacksonville,_Florida#p1"
    )
    assert parse_citations("<<SRC:wiki:Category:Ça_va/1.2-3>>")[0].entity_id == "Category:Ça_va/1.2-3"
    assert parse_citations("<<SRC:squad:" + "x" * 256 + ">>")[0].entity_id == "x" * 256


def test_nested_unclosed_and_duplicates() -> None:
    nested = "<<SRC:a:<<SRC:b:c>>>>"
    assert [(c.source_id, c.start) for c in parse_citations(nested)] == [("b:c", 8)]
    assert strip_citations("x <<SRC:a:y<<SRC:b:c>>>> z") == "x z"  # the outer one forms after a cut
    text = "<<SRC:squad:x <<SRC:d:1>> <<SRC:d:2>> <<SRC:d:1>>"
    assert [c.source_id for c in parse_citations(text)] == ["d:1", "d:2", "d:1"]
    assert [c.source_id for c in unique_citations(parse_citations(text))] == ["d:1", "d:2"]


def test_strip_tidies_spaces_only_where_markers_were() -> None:
    assert strip_citations("Paris <<SRC:a:1>>.") == "Paris."
    assert strip_citations("Paris <<SRC:a:1>> <<SRC:a:2>> is big.") == "Paris is big."
    assert strip_citations("<<SRC:a:1>> Paris\n  code  <<SRC:a:2>>\nend") == "Paris\n  code\nend"
    assert strip_citations("keep  two  spaces") == "keep  two  spaces"


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail a call still running after ``seconds``. A signal, not a thread: a regex stuck in
    backtracking holds the GIL, but checks for signals while it runs."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: not linear time")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "unit", ["<<SRC:", "<<SRC:a:", "<<SRC:a:" + "x" * 300, "<<SRC:" + " " * 7, "<<SRC:a:b>>", "<<SRC:a:x<"]
)
def test_one_megabyte_of_pathological_repeats_parses_fast(unit: str) -> None:
    text = unit * (1_000_000 // len(unit))

    with _deadline(15):
        render_markdown(text, [])
        assert parse_citations(strip_citations(text)) == []


def test_deep_nesting_strips_in_linear_time() -> None:
    text = "<<SRC:a:x" * 50_000 + ">>" * 50_000
    with _deadline(15):
        assert strip_citations(text) == ""


# --- registry --------------------------------------------------------------------------


def _json_registry(tmp_path: Path, shape: str = "list") -> Path:
    path = tmp_path / "sources.json"
    entries: dict[str, dict[str, str | None]] = {
        "squad:Huguenot#p3": {
            "name": "Huguenot, paragraph 3",
            "url": "https://en.wikipedia.org/wiki/Huguenot",
        },
        "docs:faq": {"name": "FAQ [v2]", "url": None},
    }
    if shape == "list":
        data: object = {"sources": [{"id": k, **v} for k, v in entries.items()]}
    else:
        data = entries
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("shape", ["list", "mapping"])
def test_json_registry_resolves_and_renders(tmp_path: Path, shape: str) -> None:
    reg = SourceRegistry.open(_json_registry(tmp_path, shape))
    assert len(reg) == 2
    text = "Yes <<SRC:squad:Huguenot#p3>>, see <<SRC:docs:faq>> and <<SRC:x:y>> <<SRC:squad:Huguenot#p3>>."
    resolved = reg.resolve(parse_citations(text))
    assert [r.known for r in resolved] == [True, True, False, True]
    assert render_markdown(text, resolved) == (
        "Yes [Huguenot, paragraph 3](https://en.wikipedia.org/wiki/Huguenot), see [FAQ \\[v2\\]] "
        "and [x:y] [Huguenot, paragraph 3](https://en.wikipedia.org/wiki/Huguenot)."
    )
    assert render_list(resolved) == [
        {
            "id": "squad:Huguenot#p3",
            "domain": "squad",
            "entity_id": "Huguenot#p3",
            "name": "Huguenot, paragraph 3",
            "url": "https://en.wikipedia.org/wiki/Huguenot",
            "known": True,
        },
        {
            "id": "docs:faq",
            "domain": "docs",
            "entity_id": "faq",
            "name": "FAQ [v2]",
            "url": None,
            "known": True,
        },
        {"id": "x:y", "domain": "x", "entity_id": "y", "name": "x:y", "url": None, "known": False},
    ]


def test_squad_registry_from_the_real_data(tmp_path: Path) -> None:
    out = tmp_path / "squad.sqlite"
    count = build_squad_registry([SQUAD / "train.jsonl", SQUAD / "dev.jsonl"], out)
    lines = [line for f in ("train", "dev") for line in (SQUAD / f"{f}.jsonl").read_text().splitlines()]
    passages = {json.loads(line)["passage_id"] for line in lines}
    assert count == len(passages) == 1463
    with SourceRegistry.open(out) as reg:
        assert len(reg) == count
        sky = reg.get("squad:Sky_(United_Kingdom)#p2")
        assert sky is not None and sky.name == "Sky (United Kingdom), paragraph 2"
        assert (
            render_markdown(
                "<<SRC:squad:Sky_(United_Kingdom)#p2>>",
                reg.resolve(parse_citations("<<SRC:squad:Sky_(United_Kingdom)#p2>>")),
            )
            == "[Sky (United Kingdom), paragraph 2](https://en.wikipedia.org/wiki/Sky_%28United_Kingdom%29)"
        )
    assert squad_source("Jacksonville,_Florida", "Jacksonville,_Florida#p0").name == (
        "Jacksonville, Florida, paragraph 0"
    )


@pytest.mark.parametrize("suffix", [".json", ".sqlite"])
def test_unknown_ids_persist_across_reopen_and_processes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"reg{suffix}"
    SourceRegistry.open(path, create=True).add("squad:Known#p1", "Known, paragraph 1", "https://k")
    a, b = SourceRegistry.open(path), SourceRegistry.open(path)  # two handles, as two processes
    answer = a.cite("Known <<SRC:squad:Known#p1>>, new <<SRC:squad:New#p9>> <<SRC:squad:New#p9>>", "qa")
    assert answer.text == "Known, new"
    assert [s["known"] for s in answer.sources] == [True, False]
    b.record_unknown(["squad:New#p9", "squad:Other#p2"], agent="qa2")
    assert (a.unknown_count, b.unknown_count) == (1, 2)  # cite records an id once per answer
    a.close()
    b.close()
    with SourceRegistry.open(path) as again:
        rows = again.unknown()
        assert [(r.id, r.count, r.agent) for r in rows] == [
            ("squad:New#p9", 2, "qa2"),
            ("squad:Other#p2", 1, "qa2"),
        ]
        again.add("squad:New#p9", "New, paragraph 9")
        assert [r.id for r in again.unknown()] == ["squad:Other#p2"]  # added ids leave the list
    if suffix == ".json":
        assert (tmp_path / "reg.json.unknown.sqlite").exists()


def test_record_unknown_is_thread_safe_and_logs_each_id_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = SourceRegistry.open(tmp_path / "reg.db", create=True)
    ids = [f"t:{uuid.uuid4().hex}" for _ in range(3)]
    caplog.set_level(logging.WARNING, logger="loom.agents")

    def hammer() -> None:
        for _ in range(25):
            reg.record_unknown(ids, "a")

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert reg.unknown_count == 300
    assert {r.id: r.count for r in reg.unknown()} == dict.fromkeys(ids, 100)
    logged = [r.getMessage() for r in caplog.records if "unknown source" in r.getMessage()]
    assert sorted(m.split("'")[1] for m in logged) == sorted(ids)


def test_import_jsonl_and_bad_rows(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "d:1", "name": "One", "url": "https://1"}\n\n{"id": "d:2", "name": "Two"}\n')
    reg = SourceRegistry.open(tmp_path / "r.json", create=True)
    assert reg.import_jsonl(rows) == 2
    assert SourceRegistry.open(tmp_path / "r.json").get("d:2") is not None  # written to the file
    rows.write_text('{"id": "d:3", "name": "Three"}\n{"id": "no colon", "name": "x"}\n')
    with pytest.raises(LoomError, match=r"rows\.jsonl:2: id 'no colon' is not a citable source id; use"):
        reg.import_jsonl(rows)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_registry_files_say_what_and_how_to_fix(tmp_path: Path) -> None:
    empty_db = tmp_path / "empty.db"
    sqlite3.connect(empty_db).execute("CREATE TABLE other (x)").connection.close()
    cases = {
        _write(tmp_path / "broken.json", '{"sources": [}'): "not valid UTF-8 JSON",
        _write(tmp_path / "list.json", "[1, 2]"): "expected",
        _write(tmp_path / "noname.json", '{"sources": [{"id": "a:b"}]}'): "has no 'name'",
        _write(tmp_path / "garbage.sqlite", "not a database at all" * 100): "cannot open as SQLite",
        empty_db: "no 'sources' table",
        tmp_path / "missing.json": "no such file",
        _write(tmp_path / "reg.yaml", "x"): "name it",
    }
    for path, problem in cases.items():
        with pytest.raises(LoomError) as err:
            SourceRegistry.open(path)
        assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


# --- CLI -------------------------------------------------------------------------------


def loom(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "1000"})  # rich wraps long paths
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


def test_cli_build_show_unknown(tmp_path: Path) -> None:
    reg = tmp_path / "squad.sqlite"
    out = loom("sources", "build-squad", str(reg), "--data", str(SQUAD / "dev.jsonl"), "--json")
    assert json.loads(out) == {"registry": str(reg), "sources": 300}
    shown = json.loads(loom("sources", "show", "squad:Black_Death#p20", "--registry", str(reg), "--json"))
    assert shown == {
        "id": "squad:Black_Death#p20",
        "name": "Black Death, paragraph 20",
        "url": "https://en.wikipedia.org/wiki/Black_Death",
    }
    assert "Black Death, paragraph 20" in loom(
        "sources", "show", "squad:Black_Death#p20", "--registry", str(reg)
    )
    assert "is not in the registry" in loom(
        "sources", "show", "squad:Nope#p1", "--registry", str(reg), code=2
    )
    assert "no unknown source ids" in loom("sources", "unknown", "--registry", str(reg))
    with SourceRegistry.open(reg) as r:
        r.cite("x <<SRC:squad:Nope#p1>> <<SRC:squad:[bold]x>>", agent="qa")
    listed = json.loads(loom("sources", "unknown", "--registry", str(reg), "--json"))
    assert [(u["id"], u["count"], u["agent"]) for u in listed] == [
        ("squad:Nope#p1", 1, "qa"),
        ("squad:[bold]x", 1, "qa"),
    ]
    assert "squad:[bold]x" in loom("sources", "unknown", "--registry", str(reg))


def test_cli_errors_without_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOM_SOURCES", raising=False)
    bad = _write(tmp_path / "bad.json", "{nope")
    out = loom("sources", "unknown", "--registry", str(bad), code=2)
    assert "not valid UTF-8 JSON" in out and "Traceback" not in out
    assert "pass --registry PATH or set LOOM_SOURCES" in loom("sources", "unknown", code=2)
    rows = _write(tmp_path / "rows.jsonl", '{"title": "T"}\n')
    assert "rows.jsonl:1" in loom(
        "sources", "build-squad", str(tmp_path / "o.json"), "--data", str(rows), code=2
    )
