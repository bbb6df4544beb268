"""Responses and feedback on the tiny random Mistral, over real HTTP (uvicorn on loopback) with a
real SQLite request log: response ids and versions on every route (body and headers, a stream's
before its body), the logged rows, prompts kept out, retention, a full queue that drops instead of
blocking, POST /v1/feedback (200/404/400/503), and corrections exported as training rows."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_lora_adapter
from typer.testing import CliRunner

from loom.cli.main import app as cli
from loom.data.formats import RowFormat, Templates, to_example
from loom.engine import Engine
from loom.evals.feedback import export_feedback, map_answer, unfill
from loom.serve import ServeConfig, create_app
from loom.serve.requestlog import (
    MODEL_VERSION_HEADER,
    RESPONSE_ID_HEADER,
    Feedback,
    LoggedResponse,
    RequestLog,
)
from loom.serve.server import serve_in_thread
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.importers import import_hf_dir

SYSTEM = "Answer from the passage, then cite it."
INPUT = "Passage {passage_id}: {question}"
OUTPUT = "{answer} <<SRC:squad:{passage_id}>>"
PAYLOAD = {"passage_id": "p1", "question": "What is the capital of France?"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fb_store(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Store:
    """``tiny@v1`` and adapter ``qa@v1`` whose training summary records the cited-answer templates."""
    root = tmp_path_factory.mktemp("feedback")
    store = Store(root / "store")
    base = import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    assert base.base is not None
    summary = {
        "base": {"chat_template_sha256": base.base.chat_template_sha256},
        "prompting": {
            "format": "fields",
            "system_prompt": SYSTEM,
            "input_template": INPUT,
            "output_template": OUTPUT,
            "uses_chat_template": True,
        },
    }
    folder = make_lora_adapter(tiny_dir, root / "qa", seed=5)
    publish_adapter(
        store,
        folder,
        agent="qa",
        name="qa",
        base="tiny@v1",
        version="v1",
        alias="current",
        training_summary=summary,
    )
    return store


@pytest.fixture(scope="module")
def engine(fb_store: Store) -> Iterator[Engine]:
    eng = Engine.from_store(
        "tiny",
        device="cpu",
        store=fb_store,
        max_batch_size=8,
        max_seq_len=256,
        kv_cache_mb=8,
        max_adapters=2,
        max_rank=8,
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def agents_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("map") / "AGENT_MODEL_MAP.json"
    path.write_text(
        json.dumps(
            {"agents": {"qa": {"adapter": "qa", "output": {"type": "text"}, "generation": {"max_tokens": 6}}}}
        )
    )
    return path


@contextmanager
def serving(engine: Engine, agents_file: Path, log: Path | None, **cfg: Any) -> Iterator[tuple[str, Any]]:
    """A server on loopback; yields its URL and the app (its request log: app.state.request_log)."""
    config = ServeConfig(agents_file=agents_file, request_log=log, default_max_tokens=4, **cfg)
    app = create_app(config, engine=engine)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def server(
    engine: Engine, agents_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any, Path]]:
    path = tmp_path_factory.mktemp("log") / "requests.sqlite"
    with serving(engine, agents_file, path) as (url, app):
        yield url, app, path


def stamped(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    return r.headers[RESPONSE_ID_HEADER], r.headers[MODEL_VERSION_HEADER]


def run_qa(url: str, payload: dict[str, Any] = PAYLOAD) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/agents/qa/run", json={"input": payload}, timeout=60)
    rid, version = stamped(r)
    body: dict[str, Any] = r.json()
    assert body["response_id"] == rid and version == body["model_version"]["adapter"] == "qa@v1"
    return body


# ----------------------------------------------------------------- ids, headers, rows
def test_every_route_stamps_an_id_and_the_version_and_logs_a_row(server: tuple[str, Any, Path]) -> None:
    url, app, _path = server
    seen: dict[str, tuple[str, str, Any]] = {}  # response id -> (route, version, output text)

    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "qa", "messages": MSG}, timeout=60)
    rid, version = stamped(r)
    assert (rid, version) == (r.json()["id"], r.json()["model_version"]) and version == "qa@v1"
    seen[rid] = ("/v1/chat/completions", "qa@v1", r.json()["choices"][0]["message"]["content"])

    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=60)
    rid, version = stamped(r)
    assert rid == r.json()["id"] and version == r.json()["model_version"] == "tiny@v1"  # no adapter: the base
    seen[rid] = ("/v1/completions", "tiny@v1", r.json()["choices"][0]["text"])

    for route, body, text_key in (
        ("/generate", {"prompt": "hi", "adapter": "qa"}, "text"),
        ("/chat", {"message": "hi"}, "response"),
    ):
        r = httpx.post(f"{url}{route}", json=body, timeout=60)
        rid, version = stamped(r)
        assert rid == r.json()["response_id"] and version == r.json()["model_version"]
        seen[rid] = (route, version, r.json()[text_key])

    for route, body in (
        ("/v1/chat/completions", {"model": "qa", "messages": MSG, "stream": True}),
        ("/chat/stream", {"message": "hi", "agent": "qa"}),
    ):
        with httpx.stream("POST", f"{url}{route}", json=body, timeout=60) as s:
            rid, version = stamped(s)  # the headers, before any of the body is read
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert version == "qa@v1"
        if route == "/chat/stream":
            assert events[-1]["response_id"] == rid and events[-1]["model_version"] == version
            text = events[-1]["response"]
        else:
            assert all(e["id"] == rid and e["model_version"] == version for e in events)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        seen[rid] = (route, version, text)

    one = run_qa(url)
    seen[one["response_id"]] = ("/v1/agents/{name}/run", "qa@v1", one["raw"])
    r = httpx.post(
        f"{url}/v1/agents/qa/run", json={"inputs": [PAYLOAD, {**PAYLOAD, "passage_id": "p2"}]}, timeout=60
    )
    ids, versions = stamped(r)
    data = r.json()["data"]
    assert ids.split(",") == [d["response_id"] for d in data] and versions == "qa@v1,qa@v1"
    for d in data:
        seen[d["response_id"]] = ("/v1/agents/{name}/run", "qa@v1", d["raw"])

    log: RequestLog = app.state.request_log
    log.flush()
    assert len(seen) == 9  # every id distinct
    for rid, (route, version, text) in seen.items():
        row = log.get(rid)
        assert row is not None and row.status == "ok", rid
        assert (row.route, row.output) == (route, text)
        assert (row.model_version["adapter"] or row.model_version["base"]) == version
        assert row.model_version["base"] == "tiny@v1" and row.latency_s >= 0
    agent_rows = log.for_agent("qa")
    assert {r.response_id for r in agent_rows} >= {one["response_id"], *ids.split(",")}
    assert log.get(one["response_id"]).input == PAYLOAD  # type: ignore[union-attr]
    assert log.for_agent("qa", since=time.time() + 60) == []


def test_shutdown_flushes_and_prompts_stay_out_when_asked(
    engine: Engine, agents_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "requests.sqlite"
    with serving(engine, agents_file, path, log_prompts=False) as (url, _app):
        ids = [run_qa(url)["response_id"] for _ in range(3)]
        ids.append(
            httpx.post(f"{url}/generate", json={"prompt": "secret words"}, timeout=60).json()["response_id"]
        )
    # the server is gone: what it queued is on disk, read with plain sqlite3
    with sqlite3.connect(path) as db:
        rows = dict(db.execute("SELECT response_id, input FROM responses").fetchall())
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert set(rows) == set(ids) and all(v is None for v in rows.values())
    assert "secret" not in path.read_bytes().decode("latin-1")


# ----------------------------------------------------------------- the log itself
def entry(rid: str, agent: str | None = "a", t: float | None = None) -> LoggedResponse:
    return LoggedResponse(
        rid,
        t or time.time(),
        "/v1/agents/{name}/run",
        agent,
        {"base": "b@v1", "adapter": None},
        {"x": rid},
        "out",
        0.1,
    )


def test_retention_deletes_the_oldest_rows_but_keeps_those_with_feedback(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.sqlite", retention=3, keep_prompts=True)
    log.record(entry("r0"))
    assert log.get("r0") is not None  # still queued: get() sees it already
    assert log.add_feedback(Feedback("r0", 1))
    for i in range(1, 7):
        log.record(entry(f"r{i}"))
    log.close()
    reopened = RequestLog(tmp_path / "r.sqlite", retention=3, keep_prompts=True)
    assert [r.response_id for r in reopened.for_agent("a")] == ["r0", "r4", "r5", "r6"]
    assert reopened.count() == 4 and reopened.get("r1") is None


def test_a_row_sqlite_cannot_store_neither_stops_the_writer_nor_loses_the_others(tmp_path: Path) -> None:
    """A client's JSON may carry a lone surrogate ("\\ud800" parses into one); UTF-8 cannot hold
    it, and a writer that died on it would log nothing more and hang shutdown."""
    log = RequestLog(tmp_path / "r.sqlite", retention=100, keep_prompts=True)
    bad = entry("bad")
    bad.input, bad.output = {"text": "\ud800 x"}, "\udfff y"
    log.record(bad)
    log.flush()
    log.record(entry("after"))
    log.close()  # returns: the writer is alive and drains the queue
    reopened = RequestLog(tmp_path / "r.sqlite", retention=100, keep_prompts=True)
    assert [r.response_id for r in reopened.for_agent("a")] == ["bad", "after"]
    stored = reopened.get("bad")
    assert stored is not None and stored.input == {"text": "\ud800 x"} and stored.output == "? y"
    reopened.close()


def test_a_full_queue_drops_instead_of_blocking_and_close_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    log = RequestLog(path, retention=100, keep_prompts=True, queue_size=2)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer's first batch waits for this lock
    started = time.monotonic()
    for i in range(10):
        log.record(entry(f"r{i}"))
    assert time.monotonic() - started < 0.5  # never waited for the disk
    assert 6 <= log.dropped <= 8  # 2 queued, and up to 2 the writer took before it blocked
    assert log.get("r9") is None and log.get("r0") is not None  # dropped / queued
    release = threading.Timer(0.3, lambda: (blocker.execute("COMMIT"), blocker.close()))
    release.start()
    log.close()  # waits for the lock, then writes everything queued
    with closing(sqlite3.connect(path)) as db:  # a reader: WAL lets it see what is committed now
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 10 - log.dropped
    release.join()


# ----------------------------------------------------------------- POST /v1/feedback
def test_feedback_is_stored_and_bad_requests_name_the_field(server: tuple[str, Any, Path]) -> None:
    url, app, _path = server
    rid = run_qa(url)["response_id"]
    ok = httpx.post(f"{url}/v1/feedback", json={"response_id": rid, "rating": -1, "comment": "wrong city"})
    assert ok.status_code == 200 and ok.json()["stored"] is True and ok.json()["response_id"] == rid
    stored = [f for f in app.state.request_log.feedback("qa") if f.response_id == rid]
    assert [(f.rating, f.comment, f.feedback_id) for f in stored] == [(-1, "wrong city", ok.json()["id"])]

    unknown = httpx.post(f"{url}/v1/feedback", json={"response_id": "agent-nope", "rating": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "response_id"
    assert RESPONSE_ID_HEADER in unknown.json()["error"]["message"]  # says where the id comes from
    for bad, field in (
        ({"response_id": rid, "rating": 5}, "rating"),
        ({"response_id": rid, "rating": True}, "rating"),
        ({"response_id": rid, "rating": "1"}, "rating"),
        ({"response_id": rid, "rating": 1, "corrected_answer": "  "}, "corrected_answer"),
        ({"rating": 1}, "response_id"),
        ({"response_id": rid, "rating": 1, "stars": 4}, "stars"),
    ):
        r = httpx.post(f"{url}/v1/feedback", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (bad, r.text)
        assert field in r.json()["error"]["message"]
    assert (
        "-1 (bad), 0 (neutral) or 1 (good)"
        in httpx.post(f"{url}/v1/feedback", json={"response_id": rid, "rating": 5}).json()["error"]["message"]
    )


def test_feedback_without_a_request_log_says_how_to_get_one(engine: Engine, agents_file: Path) -> None:
    with serving(engine, agents_file, None) as (url, _app):
        rid = run_qa(url)["response_id"]  # ids and headers still come without a log
        r = httpx.post(f"{url}/v1/feedback", json={"response_id": rid, "rating": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_log_off"
    assert "--request-log" in r.json()["error"]["message"]


# ----------------------------------------------------------------- export
def test_corrections_export_as_training_rows_in_the_agents_format(
    server: tuple[str, Any, Path], fb_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, app, path = server
    full, plain, other = (run_qa(url, {**PAYLOAD, "passage_id": f"q{i}"})["response_id"] for i in range(3))
    rated_only = run_qa(url)["response_id"]
    posts = [
        (full, "Paris <<SRC:squad:q0>>"),
        (plain, "Berlin"),
        (plain, "Rome"),  # the latest correction wins
        (other, "Madrid"),
        (rated_only, None),
    ]
    for rid, answer in posts:
        body = {"response_id": rid, "rating": -1, **({"corrected_answer": answer} if answer else {})}
        assert httpx.post(f"{url}/v1/feedback", json=body).status_code == 200
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "qa", "messages": MSG}, timeout=60)
    chat = r.json()["id"]  # an agent's answer, but not from an agent payload
    httpx.post(f"{url}/v1/feedback", json={"response_id": chat, "rating": 0, "corrected_answer": "x"})
    log: RequestLog = app.state.request_log
    log.flush()

    out = tmp_path / "qa.jsonl"
    result = export_feedback(log, "qa", store=fb_store, out=out)
    assert result.mode == "template" and result.config["output_template"] == OUTPUT
    assert result.config["input_template"] == INPUT and result.config["system_prompt"] == SYSTEM
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {**PAYLOAD, "passage_id": "q0", "answer": "Paris", "id": full},
        {**PAYLOAD, "passage_id": "q1", "answer": "Rome", "id": plain},
        {**PAYLOAD, "passage_id": "q2", "answer": "Madrid", "id": other},
    ]
    assert list(result.skipped.values()) == [1] and "/v1/chat/completions" in next(iter(result.skipped))
    # `loom train` reads them with the agent's own templates: the corrected answer is the target
    ex = to_example(rows[1], RowFormat.fields, Templates(INPUT, OUTPUT, SYSTEM), "qa.jsonl:2", "2")
    assert ex.id == plain and ex.messages[-1]["content"] == "Rome <<SRC:squad:q1>>"
    assert ex.messages[1]["content"] == "Passage q1: What is the capital of France?"

    # one correction that does not fit the template: every row carries the whole answer instead
    httpx.post(f"{url}/v1/feedback", json={"response_id": other, "rating": -1, "corrected_answer": {"a": 1}})
    log.flush()
    monkeypatch.setenv("LOOM_STORE", fb_store.url)
    runner = CliRunner()
    done = runner.invoke(cli, ["feedback", "export", "--agent", "qa", "--log", str(path), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "answer mode" in " ".join(done.output.split()) and "\noutput_template: '{answer}'\n" in done.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["Paris <<SRC:squad:q0>>", "Rome <<SRC:squad:q1>>", '{"a": 1}']
    listed = runner.invoke(cli, ["feedback", "ls", "--agent", "qa", "--log", str(path), "--json"])
    assert listed.exit_code == 0 and {r["response_id"] for r in json.loads(listed.output)} >= {
        full,
        rated_only,
    }
    missing = runner.invoke(cli, ["feedback", "ls", "--log", str(tmp_path / "nope.sqlite")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())


def test_answers_map_back_into_the_output_template_only_when_unambiguous() -> None:
    intent = '{{"intent": "{label}"}}'
    assert unfill(intent, '{"intent": "PlayMusic"}', {"text": "play"}) == {"label": "PlayMusic"}
    rank = '{{"evidence": {evidence_json}, "ranking": {ranking_json}}}'
    assert unfill(rank, '{"evidence": "x", "ranking": ["2", "1"]}', {"question": "q"}) == {
        "evidence_json": '"x"',
        "ranking_json": '["2", "1"]',
    }
    assert unfill("{a} {b}", "one two three", {}) is None  # two ways to split it
    assert unfill(OUTPUT, "Paris <<SRC:squad:p2>>", PAYLOAD) is None  # cites another passage

    class C:  # what map_answer reads of a correction
        def __init__(self, answer: Any) -> None:
            self.payload, self.feedback = PAYLOAD, Feedback("r", -1, answer)
            self.text = answer if isinstance(answer, str) else json.dumps(answer)

    assert map_answer(intent, C({"intent": "GetWeather"})) == {"label": "GetWeather"}  # type: ignore[arg-type]
    assert map_answer(intent, C("GetWeather")) == {"label": "GetWeather"}  # type: ignore[arg-type]
    assert map_answer(OUTPUT, C("Paris <<SRC:squad:p2>>")) is None  # type: ignore[arg-type]
    assert map_answer(rank, C("just text")) is None  # type: ignore[arg-type]
