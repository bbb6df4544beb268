"""Conversations survive the server process: a real ``loom serve --stub`` on loopback, stopped,
restarted and SIGKILLed mid-stream, over the same SQLite file. A killed stream leaves no trace
of its turn (exchanges are committed only when complete or cut off by a live server); a client
that leaves mid-stream leaves the turn marked incomplete with the text so far."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from loom.serve.server import free_port, wait_healthy

KEY = {"Authorization": "Bearer user-key"}
BRIEF = {"name": "brief.md", "text": "the quick brown fox jumps over the lazy dog"}
LONG = "tell me a long story"  # the stub answers it with 200 tokens before its end-of-turn token


@contextmanager
def served(db: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "LOOM_API_KEY": "user-key", "LOOM_STORE": str(db.parent / "store")}
    args = ["--stub", "--port", str(port), "--device", "cpu", "--max-seq-len", "512"]
    args += ["--conversations", str(db), "--request-log", "off", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "loom", "serve", *args], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


def chat(url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/chat", json={"max_tokens": 4, **body}, headers=KEY, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def messages(url: str, session: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/conversation", params={"session_id": session}, headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


def stream_until_first_delta(url: str, session: str | None, then: Any) -> str:
    """Stream a long answer; at its first delta call ``then()`` and stop reading. The text seen."""
    body: dict[str, Any] = {"message": LONG, "max_tokens": 200} | ({"session_id": session} if session else {})
    with httpx.stream("POST", f"{url}/chat/stream", json=body, headers=KEY, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert not chunk.get("done"), "the long answer finished before the cut"
                then()
                return str(chunk["delta"])
    raise AssertionError("the stream ended without a delta")


def test_a_session_survives_restarts_and_a_sigkill_mid_stream(tmp_path: Path) -> None:
    db = tmp_path / "conversations.sqlite"
    with served(db) as (url, proc):
        first = chat(url, message="hello", context_files=[BRIEF])
        session = first["session_id"]
        chat(url, message="and then?", session_id=session)
        proc.send_signal(signal.SIGTERM)  # a clean stop
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    with served(db) as (url, proc):
        before = messages(url, session)
        assert [m["content"] for m in before][::2] == ["hello", "and then?"]
        got = httpx.get(f"{url}/conversation", params={"session_id": session}, headers=KEY).json()
        assert got["context_files"] == ["brief.md"]
        again = chat(url, message="still there?", session_id=session)
        assert again["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]  # the history is in it
        stream_until_first_delta(url, session, lambda: os.kill(proc.pid, signal.SIGKILL))
        proc.wait(timeout=30)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with served(db) as (url, proc):
        after = messages(url, session)
        assert len(after) == 6 and not any(m["incomplete"] for m in after)  # no trace of the killed turn
        assert LONG not in [m["content"] for m in after]
        chat(url, message="one more", session_id=session)
        assert [m["content"] for m in messages(url, session)][::2] == [
            "hello",
            "and then?",
            "still there?",
            "one more",
        ]


def test_a_stream_the_client_leaves_is_saved_marked_incomplete(tmp_path: Path) -> None:
    with served(tmp_path / "conversations.sqlite") as (url, _):
        session = chat(url, message="hello")["session_id"]
        seen = stream_until_first_delta(url, session, lambda: None)  # leaving the block disconnects
        deadline = time.monotonic() + 30
        while len(stored := messages(url, session)) < 4:
            assert time.monotonic() < deadline, "the cut-off turn was never saved"
            time.sleep(0.1)
        question, cut = stored[2:]
        assert question == {**question, "role": "user", "content": LONG, "incomplete": False}
        assert cut["role"] == "assistant" and cut["incomplete"] and cut["content"].startswith(seen)
        chat(url, message="go on", session_id=session)
        assert len(messages(url, session)) == 6
