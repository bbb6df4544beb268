"""``loom chat`` driven through a real pseudo-terminal (pexpect): typing, streamed answers,
Ctrl-C, slash commands, failover between URLs, and ``--local`` with its in-process server.
The server is a real stub Loom server on loopback with a SQLite conversations database."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from loom.client import Client
from loom.conversations import open_store
from loom.serve import ServeConfig, create_app
from loom.serve.server import free_port, serve_in_thread

KEY = "chat-key"
PROMPT = "you> "
VERSION_LINE = "model_version stub@tiny-random"
SESSION = re.compile(r"sess-[A-Za-z0-9_-]+")


def agent_map(tmp: Path) -> Path:
    path = tmp / "agents.json"
    path.write_text(json.dumps({"agents": {"echo": {"system": "Be terse."}}}))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("chat")
    cfg = ServeConfig(
        stub=True,
        agents_file=agent_map(tmp),
        api_key=KEY,
        admin_key="chat-admin",
        conversations=str(tmp / "conversations.sqlite"),
        max_seq_len=4096,  # room for an answer long enough to be stopped halfway
    )
    with serve_in_thread(create_app(cfg)) as url:
        yield url


def spawn(tmp: Path, *args: str, key: str | None = KEY) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if k not in ("LOOM_URL", "LOOM_API_KEY")}
    env |= {"LOOM_STORE": str(tmp / "store"), "COLUMNS": "200"}
    if key:
        env["LOOM_API_KEY"] = key
    child = pexpect.spawn(
        sys.executable,
        ["-m", "loom", "chat", *args],
        env=env,
        cwd=str(tmp),
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(50, 200),
    )
    child.logfile_read = sys.stdout  # shown by pytest when a test fails
    return child


def ask(child: pexpect.spawn, line: str, *expected: str) -> str:
    """Type ``line``; wait for each of ``expected`` in order, then the next prompt; the output."""
    child.sendline(line)
    seen = ""
    for text in expected:
        child.expect_exact(text)
        seen += child.before + child.after
    child.expect_exact(PROMPT)
    return seen + child.before


def quit_cleanly(child: pexpect.spawn, how: str = "/quit") -> None:
    if how == "eof":
        child.sendeof()
    else:
        child.sendline(how)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_streams_and_ctrl_c_stops_an_answer(server: str, tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", server, "--max-tokens", "4000")
    child.expect_exact(PROMPT)
    child.sendline("tell me a long story")
    child.expect(r"base>(?:\x1b\[[0-9;]*m)? +[^\s\x1b]")  # the label, then a first piece of the answer ...
    child.sendintr()  # ... and Ctrl-C while the rest is still being generated
    child.expect_exact("answer stopped")
    assert VERSION_LINE not in child.before  # the answer never completed: it streamed
    child.expect_exact(PROMPT)
    # the session the stopped answer started goes on; the server kept the cut-off turn
    sid = SESSION.search(ask(child, "/info", "session")).group(0)  # type: ignore[union-attr]
    conv = Client(server, api_key=KEY).conversation(sid)
    assert conv.messages[-1]["incomplete"] is True
    assert conv.messages[0]["content"] == "tell me a long story"
    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect_exact("Ctrl-D leaves")
    quit_cleanly(child, "eof")


def test_commands_agent_save_load_context_info(server: str, tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", server, "--max-tokens", "6")
    child.expect_exact(PROMPT)
    ask(child, "hello", "base>", VERSION_LINE)
    switched = ask(child, "/agent echo", "talking to agent echo")
    assert "new session" in switched
    ask(child, "hi echo", "echo>", VERSION_LINE)
    info = ask(child, "/info", "server")
    assert "agent echo" in info and "stub@tiny-random" in info and server in info
    first = SESSION.search(info).group(0)  # type: ignore[union-attr]

    saved = tmp_path / "saved.json"
    ask(child, f"/save {saved}", "saved session")
    doc = json.loads(saved.read_text())
    assert doc["format"] == "loom.conversation" and doc["session_id"] == first and doc["model"] == "echo"
    assert doc["messages"][0]["content"] == "hi echo" and len(doc["messages"]) == 2

    loaded = ask(child, f"/load {saved}", "continuing in new session")
    second = SESSION.search(loaded.split("new session", 1)[1]).group(0)  # type: ignore[union-attr]
    assert second != first and "agent echo" in loaded
    ask(child, "and again", "echo>", VERSION_LINE)
    client = Client(server, api_key=KEY)
    moved = client.export_conversation(second)
    assert [m["content"] for m in moved.messages][::2] == ["hi echo", "and again"]
    assert (moved.model_extra or {})["model"] == "echo"

    notes = tmp_path / "notes.md"
    notes.write_text("The meeting is on Tuesday.")
    assert "next message starts a new session" in ask(child, f"/context {notes}", "notes.md")
    ask(child, "when is the meeting?", "echo>", VERSION_LINE)
    third = SESSION.search(ask(child, "/info", "server")).group(0)  # type: ignore[union-attr]
    assert third != second
    files = (client.export_conversation(third).model_extra or {})["context_files"]
    assert files == [{"name": "notes.md", "text": "The meeting is on Tuesday."}]

    unknown = ask(child, "/frobnicate", "unknown command /frobnicate")
    assert "/agent" in unknown and "/save" in unknown and "/quit" in unknown
    failed = ask(child, f"/load {tmp_path / 'missing.json'}", "error:")
    assert "missing.json" in failed and "Traceback" not in failed
    ask(child, "/adapter no-such-adapter", "talking to adapter no-such-adapter")
    failed = ask(child, "still there?", "error:", "400")  # one readable line, and the chat goes on
    assert "Traceback" not in failed
    quit_cleanly(child)


def test_failover_from_a_closed_port_resuming_a_session(server: str, tmp_path: Path) -> None:
    client = Client(server, api_key=KEY)
    sid = client.chat("started elsewhere", agent="echo", max_tokens=2).session_id
    closed = f"http://127.0.0.1:{free_port()}"
    child = spawn(tmp_path, "--url", closed, "--url", server, "--max-tokens", "4", "--session", sid)
    child.expect_exact(f"connected to {server}")
    child.expect_exact(f"talking to agent echo, continuing session {sid}")
    child.expect_exact(PROMPT)
    answered = ask(child, "hello", "echo>", VERSION_LINE)
    assert server in answered  # with several URLs the answer says which one gave it
    quit_cleanly(child, "eof")
    contents = [m["content"] for m in client.conversation(sid).messages]
    assert contents[0::2] == ["started elsewhere", "hello"]


def test_no_server_is_one_readable_line(tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", f"http://127.0.0.1:{free_port()}")
    child.expect_exact("error:")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "no Loom endpoint answered" in child.before
    assert "Traceback" not in child.before


def test_local_flags_need_local(tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", "http://127.0.0.1:1", "--stub")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "add --local" in child.before


def test_local_keeps_history_in_the_store_default_database(tmp_path: Path) -> None:
    child = spawn(
        tmp_path, "--local", "--stub", "--agents", str(agent_map(tmp_path)), "--max-tokens", "4", key=None
    )
    child.timeout = 120  # the in-process server builds and warms the stub model first
    child.expect_exact("connected to http://127.0.0.1:")
    child.expect_exact(PROMPT)
    child.timeout = 60
    ask(child, "/agent echo", "talking to agent echo")
    ask(child, "hello local", "echo>", VERSION_LINE)
    sid = SESSION.search(ask(child, "/info", "server")).group(0)  # type: ignore[union-attr]
    quit_cleanly(child)
    # `loom serve`'s default: conversations.sqlite beside the store
    store = open_store(tmp_path / "conversations.sqlite", max_sessions=100, max_messages=100)
    try:
        session = store.get(sid, "")
    finally:
        store.close()
    assert session is not None and session.model == "echo"
    assert session.messages[0].content == "hello local"
