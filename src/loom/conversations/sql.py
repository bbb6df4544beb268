"""The default conversation store: SQLAlchemy 2 Core over any database URL.

SQLite (the default, one file per server) is opened in WAL mode with ``synchronous=FULL``. WAL
lets readers (``GET /conversation``, ``loom conversations ls``) run beside the writer, and a
process killed at any instant (``kill -9``) loses no committed transaction and never leaves a
torn one. NORMAL would already survive a killed process; FULL also fsyncs the WAL on every
commit so that a finished exchange survives a power cut or OS crash too. That costs one fsync
per chat exchange, which is negligible next to generating the answer. Write transactions begin
with ``BEGIN IMMEDIATE``, so concurrent writers queue on SQLite's busy timeout instead of
failing when a read lock cannot be upgraded.

Any other SQLAlchemy URL works the same way (one database shared by several replicas), e.g.
PostgreSQL: ``--conversations postgresql+psycopg://loom:PASSWORD@db.internal/loom`` (install the
driver, ``pip install 'psycopg[binary]'``). The tables are created when missing.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from loom.conversations.types import ContextFile, Message, Session, SessionInfo
from loom.errors import LoomError

SCHEMA_VERSION = 1
PREVIEW_CHARS = 80
BUSY_TIMEOUT_S = 30

metadata = MetaData()
sessions = Table(
    "conversation_sessions",
    metadata,
    Column("session_id", String(128), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("model", String(256)),
    Column("context_files", JSON, nullable=False),  # [{"name", "text"}]
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Index("conversation_sessions_owner_updated", "owner", "updated"),
)
messages = Table(
    "conversation_messages",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column(
        "session_id", String(128), ForeignKey("conversation_sessions.session_id"), nullable=False, index=True
    ),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("time", Float, nullable=False),
    Column("incomplete", Boolean, nullable=False, default=False),
)
meta = Table(
    "conversation_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)


class ConversationStoreError(LoomError):
    """The database failed (unreachable, unwritable, damaged): the server's fault, not the caller's."""


class SQLConversationStore:
    def __init__(self, url: str, *, max_sessions: int, max_messages: int) -> None:
        if max_sessions < 1 or max_messages < 2:
            raise LoomError(
                f"conversation limits {max_sessions} sessions, {max_messages} messages: give at least "
                "1 session and 2 messages (one exchange)"
            )
        self.max_sessions, self.max_messages = max_sessions, max_messages
        self.url = url
        self.engine = _engine(url)
        self.shown = _shown(self.engine.url)
        # one shared connection for an in-memory database: sqlite3 wants its uses serialized
        memory = self.engine.url.get_backend_name() == "sqlite" and not self.engine.url.database
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if memory else contextlib.nullcontext()
        )
        with self._errors("create its tables"), self._write() as c:
            metadata.create_all(c)
            self._check_schema(c)

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            raise ConversationStoreError(
                f"conversation database {self.shown}: could not {doing} ({type(reason).__name__}: "
                f"{reason}); check that it is reachable and writable, or give another with "
                "loom serve --conversations URL|PATH"
            ) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._lock, self.engine.connect() as c:
            c.execution_options(loom_write=True)  # BEGIN IMMEDIATE on SQLite (see _engine)
            with c.begin():
                yield c

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock, self.engine.connect() as c, c.begin():
            yield c

    def _check_schema(self, c: Connection) -> None:
        found = c.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
        if found is None:
            c.execute(insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
        elif int(found) > SCHEMA_VERSION:
            raise LoomError(
                f"conversation database {self.shown} has schema version {found}, newer than this Loom's "
                f"{SCHEMA_VERSION}; upgrade Loom, or give another database with --conversations"
            )

    # ------------------------------------------------------------ reads
    def get(self, session_id: str, owner: str | None) -> Session | None:
        with self._errors("read a session"), self._read() as c:
            row = c.execute(select(sessions).where(sessions.c.session_id == session_id)).first()
            if row is None or not _owns(row.owner, owner):
                return None  # another key's session is indistinguishable from none at all
            rows = c.execute(
                select(messages).where(messages.c.session_id == session_id).order_by(messages.c.seq)
            ).all()
        return Session(
            session_id=row.session_id,
            owner=row.owner,
            model=row.model,
            context_files=[ContextFile(f["name"], f["text"]) for f in row.context_files],
            created=row.created,
            updated=row.updated,
            messages=[Message(m.role, m.content, m.time, bool(m.incomplete)) for m in rows],
        )

    def list(self, owner: str | None) -> list[SessionInfo]:
        which = select(sessions).order_by(sessions.c.updated.desc())
        if owner is not None:
            which = which.where(sessions.c.owner == owner)
        first = func.min(messages.c.seq).label("first")
        counts = select(messages.c.session_id, func.count().label("n"), first).group_by(messages.c.session_id)
        if owner is not None:  # this key's sessions only: never a scan of everyone's messages
            mine = select(sessions.c.session_id).where(sessions.c.owner == owner)
            counts = counts.where(messages.c.session_id.in_(mine))
        with self._errors("list sessions"), self._read() as c:
            rows = c.execute(which).all()
            stats = {r.session_id: (r.n, r.first) for r in c.execute(counts)}
            preview = select(messages.c.session_id, messages.c.content).where(
                messages.c.seq.in_(counts.with_only_columns(first))
            )
            previews: dict[str, str] = {r.session_id: r.content for r in c.execute(preview)}
        return [
            SessionInfo(
                session_id=r.session_id,
                owner=r.owner,
                model=r.model,
                created=r.created,
                updated=r.updated,
                messages=stats.get(r.session_id, (0, None))[0],
                preview=" ".join(previews.get(r.session_id, "").split())[:PREVIEW_CHARS],
            )
            for r in rows
        ]

    # ------------------------------------------------------------ writes
    def append(self, session: Session, new: Sequence[Message]) -> bool:
        now = time.time()
        with self._errors("save the exchange"), self._write() as c:
            found = c.execute(
                select(sessions.c.owner).where(sessions.c.session_id == session.session_id)
            ).scalar()
            if found is None:
                c.execute(insert(sessions).values(**_session_row(session), updated=now))
                self._evict(c, session.owner)
            elif not _owns(found, session.owner):
                return False  # the id is another key's: never write into it
            else:
                where = sessions.c.session_id == session.session_id
                c.execute(update(sessions).where(where).values(updated=now))
            self._insert_messages(c, session.session_id, new)
        return True

    def put(self, session: Session) -> Session:
        kept = session.messages[-self.max_messages :]
        with self._errors("import the session"), self._write() as c:
            where = sessions.c.session_id == session.session_id
            if c.execute(select(sessions.c.session_id).where(where)).first() is not None:
                raise LoomError(
                    f"session {session.session_id} already exists in {self.shown}; delete it first "
                    "(loom conversations rm) or import it under a new id"
                )
            c.execute(insert(sessions).values(**_session_row(session), updated=session.updated))
            self._insert_messages(c, session.session_id, kept)
            self._evict(c, session.owner, keep=session.session_id)  # never the session just imported
        session.messages = kept
        return session

    def delete(self, session_id: str, owner: str | None) -> bool:
        with self._errors("delete a session"), self._write() as c:
            found = c.execute(select(sessions.c.owner).where(sessions.c.session_id == session_id)).scalar()
            if found is None or not _owns(found, owner):
                return False
            _delete_sessions(c, [session_id])
        return True

    def close(self) -> None:
        self.engine.dispose()

    def _insert_messages(self, c: Connection, session_id: str, new: Sequence[Message]) -> None:
        if new:
            rows = [
                {"session_id": session_id, "role": m.role, "content": m.content, "time": m.time}
                | {"incomplete": m.incomplete}
                for m in new
            ]
            c.execute(insert(messages), rows)
        # the latest max_messages stay: everything at or before the first one beyond them goes
        cut = (
            select(messages.c.seq)
            .where(messages.c.session_id == session_id)
            .order_by(messages.c.seq.desc())
            .offset(self.max_messages)
            .limit(1)
            .scalar_subquery()
        )
        c.execute(delete(messages).where(messages.c.session_id == session_id, messages.c.seq <= cut))

    def _evict(self, c: Connection, owner: str, keep: str | None = None) -> None:
        """The owner's least recently updated sessions beyond max_sessions go (per owner, so one key
        filling its quota never pushes out another key's sessions); ``keep`` never goes."""
        newest = (
            select(sessions.c.session_id).where(sessions.c.owner == owner).order_by(sessions.c.updated.desc())
        )
        ids = [r[0] for r in c.execute(newest)]
        if keep in ids:  # an imported session keeps its own (old) time, and its place
            ids.remove(keep)
            ids.insert(0, keep)
        _delete_sessions(c, ids[self.max_sessions :])


def _owns(stored: str, owner: str | None) -> bool:
    return owner is None or secrets.compare_digest(stored.encode(), owner.encode())


def _session_row(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "owner": session.owner,
        "model": session.model,
        "context_files": [{"name": f.name, "text": f.text} for f in session.context_files],
        "created": session.created,
    }


def _delete_sessions(c: Connection, ids: list[str]) -> None:
    if ids:
        c.execute(delete(messages).where(messages.c.session_id.in_(ids)))
        c.execute(delete(sessions).where(sessions.c.session_id.in_(ids)))


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception as exc:  # ArgumentError, ValueError: not a URL at all
        raise LoomError(
            f"conversation database {url!r} is not a database URL ({exc}); give a SQLite path or a "
            "SQLAlchemy URL such as postgresql+psycopg://user:PASSWORD@host/db"
        ) from None
    try:
        if parsed.get_backend_name() != "sqlite":
            return create_engine(parsed, pool_pre_ping=True)
        if not parsed.database:  # in memory: one connection, or each would be its own empty database
            engine = create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S})
    except (SQLAlchemyError, OSError, ImportError) as exc:
        raise LoomError(
            f"conversation database {_shown(parsed)}: cannot open it ({exc}); install its driver "
            "(PostgreSQL: pip install 'psycopg[binary]') or give a writable SQLite path"
        ) from None
    _sqlite_pragmas(engine, wal=bool(parsed.database))
    return engine


def _sqlite_pragmas(engine: Engine, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi: Any, _record: Any) -> None:
        dbapi.isolation_level = None  # the driver's implicit BEGIN is replaced by _begin's
        cursor = dbapi.cursor()
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")  # why FULL: see the module docstring
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(c: Connection) -> None:
        c.exec_driver_sql("BEGIN IMMEDIATE" if c.get_execution_options().get("loom_write") else "BEGIN")
