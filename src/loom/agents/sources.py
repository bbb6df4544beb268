"""The source registry: what a citation id (``domain:entity_id``) is called and where it lives.

A registry is a JSON file (small, hand-written; read once into memory) or a SQLite file
(``.sqlite``/``.db``; shared by processes, read per lookup so new sources show up at once).
Ids agents cite that the registry lacks are counted in ``unknown_sources`` (in the SQLite
file, or in a ``<file>.unknown.sqlite`` next to a JSON registry) so that the registry's
maintainers can see what to add: ``loom sources unknown``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loom.agents.citations import (
    SOURCE_ID_RULE,
    Citation,
    ResolvedCitation,
    Source,
    parse_citations,
    render_list,
    render_markdown,
    split_source_id,
    strip_citations,
    unique_citations,
)
from loom.errors import LoomError

log = logging.getLogger("loom.agents")

SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sources (id TEXT PRIMARY KEY, name TEXT NOT NULL, url TEXT)",
    "CREATE TABLE IF NOT EXISTS unknown_sources (id TEXT PRIMARY KEY, count INTEGER NOT NULL, "
    "first_seen TEXT NOT NULL, last_seen TEXT NOT NULL, agent TEXT)",
)
_BUILD_HINT = (
    "build one with 'loom sources build-squad OUT --data FILE...' or SourceRegistry.open(path, create=True)"
)
# Ids logged by this process; capped so a flood of made-up ids cannot grow it without bound.
_LOGGED_CAP = 10_000
_logged: set[str] = set()
_logged_lock = threading.Lock()


@dataclass(frozen=True)
class UnknownSource:
    id: str
    count: int
    first_seen: str
    last_seen: str
    agent: str | None


@dataclass(frozen=True)
class CitedAnswer:
    """An answer's citations, resolved: what to show and what to send back."""

    text: str  # the answer without markers
    markdown: str  # markers replaced by links
    sources: list[dict[str, Any]]  # render_list: one dict per distinct source
    citations: list[ResolvedCitation]  # every marker, in order


class _Db:
    """One SQLite connection shared by threads behind a lock; WAL so readers never block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        try:
            self.conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise LoomError(f"source registry {path}: cannot open as SQLite ({exc}); {_BUILD_HINT}") from None

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.conn.execute(sql, tuple(args)).fetchall()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction (BEGIN IMMEDIATE: other processes wait, never fail halfway)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def has_table(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _checked_source(where: str, source_id: Any, name: Any, url: Any) -> Source:
    """A Source, or a LoomError naming ``where``, the problem and the fix."""
    if not isinstance(source_id, str) or split_source_id(source_id) is None:
        raise LoomError(f"{where}: id {source_id!r} is not a citable source id; use {SOURCE_ID_RULE}")
    if not isinstance(name, str) or not name.strip():
        raise LoomError(f"{where}: source {source_id} has no 'name'; give it a non-empty display name")
    if url is not None and not isinstance(url, str):
        raise LoomError(f"{where}: source {source_id} has a 'url' that is not a string; use a URL or null")
    return Source(source_id, name, url or None)


def _json_entries(path: Path, data: Any) -> list[tuple[str, Any]]:
    """(where, entry) for both accepted shapes: {"sources": [...]} and {id: {...}}."""
    if isinstance(data, dict) and isinstance(data.get("sources"), list):
        return [(f"{path}: sources[{i}]", e) for i, e in enumerate(data["sources"])]
    if isinstance(data, dict) and "sources" not in data:
        return [(f"{path}: {k!r}", {"id": k, **v} if isinstance(v, dict) else v) for k, v in data.items()]
    raise LoomError(
        f'source registry {path}: expected {{"sources": [{{"id", "name", "url"}}, ...]}} or '
        '{"domain:id": {"name", "url"}, ...}; fix the file\'s top level'
    )


def _read_json(path: Path) -> dict[str, Source]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoomError(f"source registry {path}: not valid UTF-8 JSON ({exc}); fix the file") from None
    sources: dict[str, Source] = {}
    for where, entry in _json_entries(path, data):
        if not isinstance(entry, dict):
            raise LoomError(f"{where}: expected an object with 'id', 'name' and 'url'; fix the entry")
        s = _checked_source(where, entry.get("id"), entry.get("name"), entry.get("url"))
        sources[s.id] = s
    return sources


class SourceRegistry:
    """Source ids -> display names and URLs, plus the log of cited ids it does not know.

    Thread-safe. ``unknown_count`` counts every unknown id ever recorded by this object
    (a monotonic counter for metrics)."""

    def __init__(self, path: Path, db: _Db | None, sources: dict[str, Source] | None) -> None:
        self.path = path
        self._db = db  # the SQLite registry, or None for a JSON one
        self._json = sources  # the JSON registry's sources, or None for a SQLite one
        self._unknown_db: _Db | None = db
        self._unknown_ready = False  # unknown_sources table known to exist
        self._lock = threading.Lock()
        self.unknown_count = 0

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, *, create: bool = False) -> SourceRegistry:
        """Open a JSON or SQLite registry (by suffix); ``create=True`` makes an empty one."""
        path = Path(path).expanduser()
        is_sqlite = path.suffix.lower() in SQLITE_SUFFIXES
        if not is_sqlite and path.suffix.lower() != ".json":
            raise LoomError(f"source registry {path}: unknown kind of file; name it *.json, *.sqlite or *.db")
        if not path.exists() and not create:
            raise LoomError(f"source registry {path}: no such file; {_BUILD_HINT}")
        if is_sqlite:
            return cls._open_sqlite(path, create)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"sources": []}\n', encoding="utf-8")
        return cls(path, None, _read_json(path))

    @classmethod
    def _open_sqlite(cls, path: Path, create: bool) -> SourceRegistry:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = _Db(path)
        try:
            if create:
                with db.write() as conn:
                    for stmt in _SCHEMA:
                        conn.execute(stmt)
            if not db.has_table("sources"):
                raise LoomError(f"source registry {path}: no 'sources' table in it; {_BUILD_HINT}")
            db.query("SELECT id, name, url FROM sources LIMIT 1")
        except sqlite3.Error as exc:
            db.close()
            raise LoomError(
                f"source registry {path}: not a usable SQLite registry ({exc}); "
                f"it needs a table sources(id TEXT PRIMARY KEY, name TEXT, url TEXT); {_BUILD_HINT}"
            ) from None
        except LoomError:
            db.close()
            raise
        return cls(path, db, None)

    def close(self) -> None:
        for db in {id(d): d for d in (self._db, self._unknown_db) if d is not None}.values():
            db.close()

    def __enter__(self) -> SourceRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def unknown_path(self) -> Path:
        """Where unknown ids are kept: the registry itself, or a sidecar next to a JSON file."""
        return self.path if self._db else self.path.with_name(self.path.name + ".unknown.sqlite")

    # --- lookups ---------------------------------------------------------------------

    def __len__(self) -> int:
        if self._json is not None:
            return len(self._json)
        assert self._db is not None
        return int(self._db.query("SELECT COUNT(*) FROM sources")[0][0])

    def get(self, source_id: str) -> Source | None:
        return self._lookup([source_id]).get(source_id)

    def _lookup(self, ids: list[str]) -> dict[str, Source]:
        if self._json is not None:
            return {i: self._json[i] for i in ids if i in self._json}
        assert self._db is not None
        found: dict[str, Source] = {}
        for k in range(0, len(ids), 500):  # SQLite caps the number of ? parameters
            chunk = ids[k : k + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id, name, url FROM sources WHERE id IN ({marks})"
            for sid, name, url in self._db.query(sql, chunk):
                found[sid] = Source(sid, name, url or None)
        return found

    def resolve(self, citations: Iterable[Citation]) -> list[ResolvedCitation]:
        """Each citation with its source, or ``source=None`` when unknown. Records nothing."""
        cites = list(citations)
        found = self._lookup(list(dict.fromkeys(c.source_id for c in cites)))
        return [ResolvedCitation(c, found.get(c.source_id)) for c in cites]

    def cite(self, text: str, agent: str | None = None) -> CitedAnswer:
        """Everything a server does with one answer: parse, resolve, record each unknown id
        once for this answer, and render text, markdown and the source list."""
        resolved = self.resolve(parse_citations(text))
        unknown = [c.source_id for c in unique_citations(r.citation for r in resolved if not r.known)]
        if unknown:
            self.record_unknown(unknown, agent)
        markdown = render_markdown(text, resolved)
        return CitedAnswer(strip_citations(text), markdown, render_list(resolved), resolved)

    # --- unknown ids -------------------------------------------------------------------

    def _unknown(self, create: bool) -> _Db | None:
        with self._lock:
            if self._unknown_db is None and (create or self.unknown_path.exists()):
                self._unknown_db = _Db(self.unknown_path)
            db, ready = self._unknown_db, self._unknown_ready
        if db is not None and create and not ready:
            with db.write() as conn:
                conn.execute(_SCHEMA[1])
            self._unknown_ready = True
        return db

    def record_unknown(self, ids: Iterable[str], agent: str | None = None) -> None:
        """Count each occurrence of each id (persisted), log each id once per process.

        A failure to persist is logged, not raised: a citation log must not fail an answer."""
        counts = Counter(ids)
        if not counts:
            return
        with self._lock:
            self.unknown_count += sum(counts.values())
        self._log_new(counts, agent)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [(sid, n, now, now, agent) for sid, n in counts.items()]
        try:
            db = self._unknown(create=True)
            assert db is not None
            with db.write() as conn:
                conn.executemany(
                    "INSERT INTO unknown_sources (id, count, first_seen, last_seen, agent) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET count = count + excluded.count, "
                    "last_seen = excluded.last_seen, agent = COALESCE(excluded.agent, agent)",
                    rows,
                )
        except (sqlite3.Error, LoomError) as exc:
            log.warning(
                "cannot record unknown source ids in %s (%s); is it writable?", self.unknown_path, exc
            )

    def _log_new(self, counts: Counter[str], agent: str | None) -> None:
        with _logged_lock:
            fresh = [sid for sid in counts if sid not in _logged and len(_logged) < _LOGGED_CAP]
            _logged.update(fresh)
        for sid in fresh:
            log.warning("agent %s cited unknown source %r; add it to %s", agent or "?", sid, self.path)

    def unknown(self) -> list[UnknownSource]:
        """Cited ids the registry still lacks, most cited first."""
        db = self._unknown(create=False)
        if db is None or not db.has_table("unknown_sources"):
            return []
        rows = db.query(
            "SELECT id, count, first_seen, last_seen, agent FROM unknown_sources ORDER BY count DESC, id"
        )
        known = self._lookup([r[0] for r in rows])
        return [UnknownSource(*r) for r in rows if r[0] not in known]

    # --- building ----------------------------------------------------------------------

    def add(self, source_id: str, name: str, url: str | None = None) -> None:
        self.add_many([_checked_source(f"source {source_id!r}", source_id, name, url)])

    def add_many(self, sources: Iterable[Source]) -> int:
        """Insert or replace sources in one write; returns how many were given."""
        batch = [_checked_source(f"source {s.id!r}", s.id, s.name, s.url) for s in sources]
        if self._json is not None:
            with self._lock:
                self._json.update((s.id, s) for s in batch)
                self._save_json()
            return len(batch)
        assert self._db is not None
        with self._db.write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO sources (id, name, url) VALUES (?, ?, ?)",
                [(s.id, s.name, s.url) for s in batch],
            )
        return len(batch)

    def _save_json(self) -> None:
        from loom.store.backends import LocalBackend

        assert self._json is not None
        payload = {"sources": [{"id": s.id, "name": s.name, "url": s.url} for s in self._json.values()]}
        data = json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
        LocalBackend(self.path.parent).write_atomic(self.path.name, data)

    def import_jsonl(self, path: Path) -> int:
        """Add sources from a JSONL file of ``{"id", "name", "url"}`` rows; returns the count."""
        batch = []
        for where, row in _rows(path):
            if not isinstance(row, dict):
                raise LoomError(f"{where}: expected an object with 'id', 'name' and 'url'; fix the row")
            batch.append(_checked_source(where, row.get("id"), row.get("name"), row.get("url")))
        return self.add_many(batch)


def _rows(path: Path) -> list[tuple[str, Any]]:
    """(file:line, row) for each row of a JSONL file; a LoomError at the first bad line."""
    from loom.data.reader import _rows_of  # the one JSONL reader with file:line locations

    if not path.is_file():
        raise LoomError(f"{path}: no such file; check the path")
    rows = _rows_of(path)
    for where, row in rows:
        if isinstance(row, Exception):
            raise LoomError(f"{where}: invalid JSON ({row}); fix or remove the line")
    return rows


def squad_source(title: str, passage_id: str) -> Source:
    """``Huguenot#p3`` -> ``squad:Huguenot#p3``, "Huguenot, paragraph 3" and its Wikipedia page.

    The paragraph number is SQuAD's index within the article (as in the id, from 0)."""
    name = title.replace("_", " ")
    _, sep, para = passage_id.rpartition("#p")
    if sep and para.isdigit():
        name = f"{name}, paragraph {int(para)}"
    return Source(f"squad:{passage_id}", name, f"https://en.wikipedia.org/wiki/{title}")


def build_squad_registry(jsonl_paths: list[Path], out: Path) -> int:
    """Write (or update) registry ``out`` with every passage of SQuAD-style JSONL rows
    (``passage_id``, ``title``, ``context``); returns the number of distinct sources."""
    found: dict[str, Source] = {}
    for path in jsonl_paths:
        for where, row in _rows(Path(path)):
            title = row.get("title") if isinstance(row, dict) else None
            passage_id = row.get("passage_id") if isinstance(row, dict) else None
            if not isinstance(title, str) or not title or not isinstance(passage_id, str) or not passage_id:
                raise LoomError(f"{where}: a SQuAD row needs the string fields 'title' and 'passage_id'")
            s = squad_source(title, passage_id)
            found[s.id] = _checked_source(where, s.id, s.name, s.url)
    if not found:
        raise LoomError(f"no SQuAD rows in {', '.join(map(str, jsonl_paths))}; pass the squad_qa JSONL files")
    with SourceRegistry.open(out, create=True) as registry:
        registry.add_many(found.values())
    return len(found)
