"""Conversations on real SQLite files: the store (durability settings, bounds, owners,
concurrent writers), trimming measured with the tokenizer, the export format, the
``loom conversations`` CLI, and the HTTP routes of a real server on loopback (context files,
trimmed turns, key isolation, export -> import)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loom.cli.main import app as cli
from loom.conversations import ContextFile, Message, Session, new_session_id, open_store, owner_id
from loom.conversations.io import (
    ConversationDocument,
    export_session,
    import_session,
    read_document,
    write_document,
)
from loom.conversations.sql import SQLConversationStore
from loom.conversations.trimming import fit, system_text
from loom.engine import Engine
from loom.errors import LoomError
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.testing import make_tokenizer


def exchange(i: int, incomplete: bool = False) -> list[Message]:
    return [Message("user", f"question {i}"), Message("assistant", f"answer {i}", incomplete=incomplete)]


def opened(path: Path, sessions: int = 100, messages: int = 40) -> SQLConversationStore:
    store = open_store(path, max_sessions=sessions, max_messages=messages)
    assert isinstance(store, SQLConversationStore)
    return store


# ----------------------------------------------------------------- the store
def test_sessions_persist_in_wal_with_full_sync_and_stay_bounded(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "conversations.sqlite"
    store = opened(db, messages=6)
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    session = Session(new_session_id(), "alice", "bot", [ContextFile("brief.md", "# Brief\nbe kind")])
    for i in range(5):
        assert store.append(session, exchange(i, incomplete=i == 4))
    store.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = opened(db, messages=6).get(session.session_id, "alice")  # a new process's view
    assert again is not None and again.model == "bot"
    assert again.context_files == [ContextFile("brief.md", "# Brief\nbe kind")]
    assert [m.content for m in again.messages] == [
        f"{w} {i}" for i in (2, 3, 4) for w in ("question", "answer")
    ]
    assert [m.incomplete for m in again.messages] == [False] * 5 + [True]


def test_another_owners_session_is_no_session(tmp_path: Path) -> None:
    store = opened(tmp_path / "c.sqlite")
    session = Session(new_session_id(), owner_id("alice-key"))
    store.append(session, exchange(1))
    mallory = owner_id("mallory-key")
    assert store.get(session.session_id, mallory) is None
    assert store.list(mallory) == [] and not store.delete(session.session_id, mallory)
    assert not store.append(Session(session.session_id, mallory), exchange(2))  # never writes into it
    kept = store.get(session.session_id, owner_id("alice-key"))
    assert kept is not None and len(kept.messages) == 2
    assert [i.session_id for i in store.list(None)] == [session.session_id]  # the operator sees all


def test_each_key_keeps_its_latest_sessions(tmp_path: Path) -> None:
    store = opened(tmp_path / "c.sqlite", sessions=3)
    other = Session(new_session_id(), "bob")
    store.append(other, exchange(0))
    alice = [Session(new_session_id(), "alice") for _ in range(5)]
    for i, session in enumerate(alice):
        store.append(session, exchange(i))
    assert {i.session_id for i in store.list("alice")} == {s.session_id for s in alice[2:]}
    assert store.get(other.session_id, "bob") is not None  # alice's quota never pushes out bob's


def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    stores = [opened(db, messages=1000) for _ in range(2)]  # two engines: like two processes
    session = Session(new_session_id(), "alice")
    stores[0].append(session, exchange(-1))
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(15):
                stores[k % 2].append(session, exchange(k * 100 + i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = stores[0].get(session.session_id, "alice")
    assert got is not None and len(got.messages) == 2 + 4 * 15 * 2
    pairs = list(zip(got.messages[::2], got.messages[1::2], strict=True))  # each exchange stays together
    assert all(q.content.split()[1] == a.content.split()[1] for q, a in pairs)


def test_a_bad_database_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(LoomError, match=r"dir\.sqlite.*--conversations"):
        opened(tmp_path / "dir.sqlite")
    with pytest.raises(LoomError, match=r"nosuchdb\+x://u:\*\*\*@h/d.*driver"):
        open_store("nosuchdb+x://u:secret@h/d", max_sessions=1, max_messages=2)


# ----------------------------------------------------------------- trimming
@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def test_trimming_keeps_context_and_latest_turns_within_the_limit(tokenizer: Any) -> None:
    def encode(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    brief = ContextFile("brief.md", "the quick brown fox jumps over the lazy dog " * 3)
    head = [{"role": "system", "content": system_text("You are terse.", [brief], None)}]
    history = [
        {"role": role, "content": f"{role} turn {i}: play some music by the beatles " * 2}
        for i in range(30)
        for role in ("user", "assistant")
    ]
    tail = [{"role": "user", "content": "what is the weather like in paris tomorrow"}]
    bare = len(encode([*head, *tail]))  # the context file and the new message, always kept
    for budget in (bare + 100, bare + 300, bare + 700):
        fitted = fit(head, history, tail, encode, budget)
        assert len(fitted.ids) <= budget and fitted.trimmed_turns > 0
        assert fitted.messages[0] == head[0] and brief.text in fitted.messages[0]["content"]
        assert fitted.messages[-1] == tail[0] and fitted.messages[-3:-1] == history[-2:]  # the latest turn
        one_more = history[2 * (fitted.trimmed_turns - 1) :]
        assert len(encode([*head, *one_more, *tail])) > budget  # the fewest turns were dropped
    everything = fit(head, history, tail, encode, 10_000)
    assert everything.trimmed_turns == 0 and len(everything.messages) == 62
    nothing_fits = fit(head, history, tail, encode, bare - 1)
    assert nothing_fits.trimmed_turns == 30 and nothing_fits.messages == [*head, *tail]


# ----------------------------------------------------------------- export / import
def test_export_import_round_trip_and_a_documented_version(tmp_path: Path) -> None:
    store = opened(tmp_path / "c.sqlite")
    session = Session(new_session_id(), "alice", "bot", [ContextFile("a.md", "A"), ContextFile("b.txt", "B")])
    store.append(session, exchange(1))
    store.append(session, exchange(2, incomplete=True))
    original = store.get(session.session_id, "alice")
    assert original is not None
    write_document(export_session(original), tmp_path / "s.json")
    raw = json.loads((tmp_path / "s.json").read_text())
    assert raw["format"] == "loom.conversation" and raw["version"] == 1 and "owner" not in raw
    copy = store.put(import_session(read_document(tmp_path / "s.json"), "bob"))
    assert copy.session_id != session.session_id and copy.session_id.startswith("sess-")
    back = store.get(copy.session_id, "bob")
    assert back is not None and (back.model, back.context_files) == (original.model, original.context_files)
    assert back.messages == original.messages
    with pytest.raises(LoomError, match="already exists"):
        store.put(import_session(read_document(tmp_path / "s.json"), "bob", keep_id=True))
    (tmp_path / "new.json").write_text(json.dumps({**raw, "version": 2}))
    with pytest.raises(LoomError, match=r"version.*loom conversations export"):
        read_document(tmp_path / "new.json")
    (tmp_path / "odd.json").write_text(json.dumps({**raw, "owner": "x"}))
    with pytest.raises(LoomError, match="owner"):
        read_document(tmp_path / "odd.json")


def test_cli_lists_exports_imports_and_removes(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    store = opened(db)
    session = Session(new_session_id(), owner_id("server-key"), "bot", [ContextFile("a.md", "A")])
    store.append(session, exchange(1))
    store.close()
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> str:
        result = runner.invoke(cli, ["conversations", *args, "--db", str(db)], env=env)
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    listed = json.loads(run("ls", "--json"))
    assert [(s["session_id"], s["messages"], s["preview"]) for s in listed] == [
        (session.session_id, 2, "question 1")
    ]
    run("export", session.session_id, "-o", str(tmp_path / "s.json"))
    imported = json.loads(
        run("import", str(tmp_path / "s.json"), "--json", env={"LOOM_API_KEY": "other-key"})
    )
    new = opened(db).get(imported["session_id"], owner_id("other-key"))
    assert new is not None and new.context_files == [ContextFile("a.md", "A")] and len(new.messages) == 2
    run("rm", session.session_id)
    assert [s["session_id"] for s in json.loads(run("ls", "--json"))] == [imported["session_id"]]
    missing = runner.invoke(cli, ["conversations", "rm", session.session_id, "--db", str(db)])
    assert missing.exit_code == 2 and "loom conversations ls" in missing.output
    absent = runner.invoke(cli, ["conversations", "ls", "--db", str(tmp_path / "none.sqlite")])
    assert absent.exit_code == 2 and "--conversations" in absent.output


# ----------------------------------------------------------------- over HTTP
ALICE, MALLORY = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer other-key"}


@pytest.fixture
def url(engine: Engine, tmp_path: Path) -> Iterator[str]:
    cfg = ServeConfig(api_key="user-key", admin_key="other-key", conversations=str(tmp_path / "c.sqlite"))
    with serve_in_thread(create_app(cfg, engine=engine)) as served:
        yield served


def chat(url: str, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/chat", json={"max_tokens": 4, **body}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_sessions_keep_their_model_and_context_files(url: str) -> None:
    files = [{"name": "brief.md", "text": "the quick brown fox " * 4}]
    plain = chat(url, ALICE, message="hi")
    first = chat(url, ALICE, message="hi", adapter="qv4", context_files=files)
    assert first["model_version"] == "qv4@v1" and first["trimmed_turns"] == 0
    assert first["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10  # the file is in the prompt
    session = first["session_id"]
    second = chat(url, ALICE, message="more", session_id=session)  # the session's adapter, unasked
    assert second["model_version"] == "qv4@v1"
    mismatch = httpx.post(
        f"{url}/chat", json={"message": "x", "session_id": session, "adapter": "o2"}, headers=ALICE
    )
    assert mismatch.status_code == 400 and mismatch.json()["error"]["code"] == "session_model_mismatch"
    again = httpx.post(
        f"{url}/chat", json={"message": "x", "session_id": session, "context_files": files}, headers=ALICE
    )
    assert again.status_code == 400 and again.json()["error"]["param"] == "context_files"
    got = httpx.get(f"{url}/conversation", params={"session_id": session}, headers=ALICE).json()
    assert got["model"] == "qv4" and got["context_files"] == ["brief.md"] and len(got["messages"]) == 4


def test_long_sessions_report_their_trimmed_turns(url: str) -> None:
    session, trimmed = None, []
    for _ in range(6):
        body: dict[str, Any] = {"message": "play some music by the beatles " * 4, "max_tokens": 8}
        answer = chat(url, ALICE, **body, **({"session_id": session} if session else {}))
        session = answer["session_id"]
        assert answer["usage"]["prompt_tokens"] <= 128 - 8
        trimmed.append(answer["trimmed_turns"])
    assert trimmed[0] == 0 and trimmed[-1] > 0 and trimmed == sorted(trimmed)
    stored = httpx.get(f"{url}/conversation", params={"session_id": session}, headers=ALICE).json()
    assert len(stored["messages"]) == 12  # trimmed from the prompt, never from the session


def test_keys_see_only_their_sessions_and_export_import_round_trips(url: str) -> None:
    files = [{"name": "brief.md", "text": "be kind"}]
    session = chat(url, ALICE, message="hi", context_files=files)["session_id"]
    chat(url, ALICE, message="and?", session_id=session)
    mine = httpx.get(f"{url}/conversations", headers=ALICE).json()["sessions"]
    assert [(s["session_id"], s["messages"], s["preview"]) for s in mine] == [(session, 4, "hi")]
    assert httpx.get(f"{url}/conversations", headers=MALLORY).json() == {"sessions": []}
    params = {"session_id": session}
    stolen = httpx.get(f"{url}/conversation/export", params=params, headers=MALLORY)
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "session_not_found"
    doc = httpx.get(f"{url}/conversation/export", params=params, headers=ALICE).json()
    assert doc["format"] == "loom.conversation" and doc["version"] == 1
    assert doc["context_files"] == files and [m["content"] for m in doc["messages"]][::2] == ["hi", "and?"]
    ConversationDocument.model_validate(doc)
    imported = httpx.post(f"{url}/conversation/import", json=doc, headers=MALLORY).json()
    copy = imported["session_id"]
    assert copy != session and imported == {"session_id": copy, "messages": 4, "dropped_messages": 0}
    assert httpx.get(f"{url}/conversation", params={"session_id": copy}, headers=ALICE).status_code == 404
    theirs = httpx.get(f"{url}/conversation/export", params={"session_id": copy}, headers=MALLORY).json()
    assert theirs["messages"] == doc["messages"] and theirs["context_files"] == files
    assert chat(url, MALLORY, message="go on", session_id=copy)["session_id"] == copy
    path = httpx.post(f"{url}/conversation/import", json={**doc, "model": "../etc"}, headers=ALICE)
    assert path.status_code == 400 and path.json()["error"]["param"] == "model"
    assert httpx.delete(f"{url}/conversation", params=params, headers=MALLORY).status_code == 404
    assert httpx.delete(f"{url}/conversation", params=params, headers=ALICE).json()["deleted"]
