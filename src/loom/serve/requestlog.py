"""The request log: one SQLite row per response a server gave, and the feedback posted on them.

Every response that produced model output has a response id (``X-Loom-Response-Id``; the body's
``id`` on OpenAI routes, ``response_id`` elsewhere) and the version that answered
(``X-Loom-Model-Version``, the body's ``model_version``). The log keeps, per response: the id,
the time it arrived (Unix seconds), the route, the agent (when one answered), the base and
adapter versions, the input (unless prompts are kept out), the output text, the latency and a
status (``ok``, ``error``, ``cancelled``). Feedback lives in the same file (table ``feedback``),
so ``loom feedback export`` needs only that file.

Serving never waits on the disk: :meth:`RequestLog.record` puts the row on a bounded queue that a
writer thread drains in batches (one transaction each); when the queue is full the row is
dropped and counted (``dropped``), never blocking a request. :meth:`RequestLog.close` writes what
is queued before returning. The file is in WAL mode, so readers (``loom feedback``, the feedback
route) never block the writer. The oldest rows beyond ``retention`` are deleted, except rows that
have feedback: those are training data.

Only the standard library: the CLI reads the log without importing the server. The server's
side (stamping a response, logging it) is :mod:`loom.serve.stamp`.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from loom.errors import LoomError

log = logging.getLogger("loom.serve")

RESPONSE_ID_HEADER = "X-Loom-Response-Id"  # the header names are shared with loom.serve.stamp
MODEL_VERSION_HEADER = "X-Loom-Model-Version"
LOG_FILE = "requests.sqlite"
DEFAULT_RETENTION = 100_000  # rows; about 100 MB with prompts of a few KB
DEFAULT_QUEUE = 10_000  # rows waiting for the writer before new ones are dropped
BATCH = 256  # rows per write transaction
RATINGS = (-1, 0, 1)  # bad, neutral, good
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    route TEXT NOT NULL,
    agent TEXT,
    base TEXT,
    adapter TEXT,
    input TEXT,
    output TEXT,
    latency_s REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_agent_time ON responses (agent, time);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    feedback_id TEXT NOT NULL UNIQUE,
    response_id TEXT NOT NULL,
    time REAL NOT NULL,
    rating INTEGER NOT NULL,
    corrected_answer TEXT,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback (response_id);
"""
_COLUMNS = "response_id, time, route, agent, base, adapter, input, output, latency_s, status"
_FEEDBACK_COLUMNS = "feedback_id, response_id, time, rating, corrected_answer, comment"


@dataclass
class LoggedResponse:
    response_id: str
    time: float  # Unix seconds when the request arrived
    route: str  # the route template, e.g. /v1/agents/{name}/run
    agent: str | None  # the agent that answered (None: a plain base or adapter request)
    model_version: dict[str, str | None]  # {"base": name@version, "adapter": name@version or None}
    input: dict[str, Any] | str | None  # the agent payload, messages or prompt; None: not kept
    output: str | None  # the answer text (several choices: a JSON list of their texts)
    latency_s: float
    status: str = "ok"  # ok | error | cancelled


@dataclass
class Feedback:
    response_id: str
    rating: int  # -1 bad, 0 neutral, 1 good
    corrected_answer: str | dict[str, Any] | list[Any] | None = None
    comment: str | None = None
    time: float = field(default_factory=time.time)
    feedback_id: str = field(default_factory=lambda: f"fb-{uuid.uuid4().hex}")


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def default_log_path(store_root: str, filename: str = LOG_FILE) -> Path:
    """``requests.sqlite`` (or ``filename``) beside a local store (``<store root>/../requests.sqlite``);
    for a remote store (s3://...), in Loom's user data folder."""
    if "://" not in store_root:
        return Path(store_root).expanduser().resolve().parent / filename
    from platformdirs import user_data_dir

    return Path(user_data_dir("loom", appauthor=False)) / filename


def _since(value: float | datetime | None) -> float:
    if value is None:
        return float("-inf")
    return value.timestamp() if isinstance(value, datetime) else float(value)


class RequestLog:
    """``record`` from the event loop (never blocks); everything else from a thread."""

    def __init__(
        self, path: Path, *, retention: int, keep_prompts: bool, queue_size: int = DEFAULT_QUEUE
    ) -> None:
        if retention < 1:
            raise LoomError(f"request log retention {retention}: give a number of rows >= 1")
        self.path, self.retention, self.keep_prompts = Path(path), retention, keep_prompts
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise LoomError(
                f"request log {self.path}: cannot open it as SQLite ({exc}); give the path of a "
                "writable request log (loom serve: --request-log PATH or --request-log off)"
            ) from None
        self.dropped = 0  # rows lost to a full queue or a failed write
        self._queue: queue.Queue[LoggedResponse | None] = queue.Queue(queue_size)
        self._pending: dict[str, LoggedResponse] = {}  # queued, not yet written: get() sees them
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------ connections
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (one per thread and call: sqlite3 objects are thread-bound)."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable enough for a log, no fsync a row
            with db:  # one transaction, committed on success
                yield db

    # ------------------------------------------------------------ writing
    def record(self, entry: LoggedResponse) -> None:
        """Queue ``entry`` for the writer; drop and count it when the queue is full or closed."""
        if not self.keep_prompts:
            entry = replace(entry, input=None)
        with self._lock:
            if self._closed:
                self._drop("the log is closed")
                return
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="loom-request-log", daemon=True)
                self._writer.start()
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                self._drop(f"{self._queue.maxsize} rows are waiting for the disk")
                return
            self._pending[entry.response_id] = entry

    def _drop(self, why: str, n: int = 1) -> None:
        self.dropped += n
        if self.dropped == n or self.dropped // 1000 != (self.dropped - n) // 1000:
            log.warning("request log %s: dropped %d row(s) so far (%s)", self.path, self.dropped, why)

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [e for e in batch if e is not None]
            stop = len(rows) < len(batch)
            try:
                if rows:
                    self._write(rows)
            except Exception as exc:  # a full disk or one unstorable row must not stop logging
                with self._lock:
                    self._drop(f"write failed: {exc}", len(rows))
            finally:
                with self._lock:
                    for e in rows:
                        self._pending.pop(e.response_id, None)
                for _ in batch:
                    self._queue.task_done()

    def _write(self, rows: list[LoggedResponse]) -> None:
        with self._db() as db:
            db.executemany(
                f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [_to_row(e) for e in rows],
            )
            # the newest `retention` rows stay, and every row someone gave feedback on
            db.execute(
                "DELETE FROM responses WHERE seq <= (SELECT MAX(seq) FROM responses) - ? "
                "AND response_id NOT IN (SELECT response_id FROM feedback)",
                (self.retention,),
            )

    def flush(self) -> None:
        """Return once every row queued so far is written."""
        self._queue.join()

    @classmethod
    def reader(cls, path: Path) -> RequestLog:
        """The log opened to read (loom trace, feedback export, retrain): it never trims what the
        server keeps."""
        return cls(path, retention=2**62, keep_prompts=True)

    def close(self) -> None:
        """Write what is queued, then stop the writer. Idempotent; later records are dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
        if writer is not None and writer.is_alive():
            self._queue.put(None)  # the live writer drains the queue, so this slot frees up
            writer.join()

    # ------------------------------------------------------------ reading
    def get(self, response_id: str) -> LoggedResponse | None:
        with self._lock:
            pending = self._pending.get(response_id)
        if pending is not None:
            return pending
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM responses WHERE response_id = ?", (response_id,)
            ).fetchone()
        return _from_row(row) if row else None

    def for_agent(self, agent: str, since: float | datetime | None = None) -> list[LoggedResponse]:
        """The agent's logged responses from ``since`` on, oldest first."""
        start = _since(since)
        with self._db() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM responses WHERE agent = ? AND time >= ? ORDER BY seq",
                (agent, start),
            ).fetchall()
        found = [_from_row(r) for r in rows]
        seen = {e.response_id for e in found}
        with self._lock:
            queued = [e for e in self._pending.values() if e.agent == agent and e.time >= start]
        return found + [e for e in queued if e.response_id not in seen]

    def count(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    # ------------------------------------------------------------ feedback
    def add_feedback(self, feedback: Feedback) -> bool:
        """Store ``feedback``; False (nothing stored) when its response is not in the log."""
        if feedback.rating not in RATINGS:
            raise LoomError(f"rating {feedback.rating!r}: give -1 (bad), 0 (neutral) or 1 (good)")
        if self.get(feedback.response_id) is None:
            return False
        answer = feedback.corrected_answer
        with self._db() as db:
            db.execute(
                f"INSERT INTO feedback ({_FEEDBACK_COLUMNS}) VALUES (?,?,?,?,?,?)",
                (
                    feedback.feedback_id,
                    feedback.response_id,
                    feedback.time,
                    feedback.rating,
                    None if answer is None else json.dumps(answer, ensure_ascii=True),
                    None
                    if feedback.comment is None
                    else feedback.comment.encode("utf-8", "replace").decode(),
                ),
            )
        return True

    def feedback(self, agent: str | None = None, since: float | datetime | None = None) -> list[Feedback]:
        """Feedback, oldest first; with ``agent``, only on that agent's responses."""
        cols = ", ".join(f"f.{c}" for c in _FEEDBACK_COLUMNS.split(", "))
        query = f"SELECT {cols} FROM feedback f"
        args: list[Any] = []
        if agent is not None:
            query += " JOIN responses r ON r.response_id = f.response_id WHERE r.agent = ? AND f.time >= ?"
            args += [agent, _since(since)]
        else:
            query += " WHERE f.time >= ?"
            args.append(_since(since))
        with self._db() as db:
            rows = db.execute(query + " ORDER BY f.seq", args).fetchall()
        return [
            Feedback(
                feedback_id=r[0],
                response_id=r[1],
                time=r[2],
                rating=r[3],
                corrected_answer=None if r[4] is None else json.loads(r[4]),
                comment=r[5],
            )
            for r in rows
        ]


def _storable(text: str | None) -> str | None:
    """``text`` as SQLite can store it: lone surrogates (from JSON escapes) become "?"."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _to_row(e: LoggedResponse) -> tuple[Any, ...]:
    return (
        e.response_id,
        e.time,
        e.route,
        e.agent,
        e.model_version.get("base"),
        e.model_version.get("adapter"),
        # ASCII JSON and replaced lone surrogates: a client's "\ud800" must not fail a write
        None if e.input is None else json.dumps(e.input, ensure_ascii=True),
        _storable(e.output),
        e.latency_s,
        e.status,
    )


def _from_row(r: tuple[Any, ...]) -> LoggedResponse:
    return LoggedResponse(
        response_id=r[0],
        time=r[1],
        route=r[2],
        agent=r[3],
        model_version={"base": r[4], "adapter": r[5]},
        input=None if r[6] is None else json.loads(r[6]),
        output=r[7],
        latency_s=r[8],
        status=r[9],
    )


def open_log(path: Path | None, retention: int, keep_prompts: bool) -> RequestLog | None:
    """The server's log, or None when it is off (``path`` None)."""
    if path is None:
        return None
    log.info(
        "request log: %s (retention %d rows, prompts %s)", path, retention, "kept" if keep_prompts else "off"
    )
    return RequestLog(path, retention=retention, keep_prompts=keep_prompts)
