"""``loom conversations``: the /chat sessions in a server's conversations database (list,
export, import, remove), read and written directly, with the server running or not."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from loom.cli.output import console, err_console, print_json
from loom.errors import LoomError

if TYPE_CHECKING:
    from loom.conversations import ConversationStore

app = typer.Typer(help="Conversations of /chat sessions: list, export to JSON, import, remove.")
_O = typer.Option
DB_HELP = (
    "The conversations database: a SQLite file or a SQLAlchemy URL (default: conversations.sqlite "
    "beside the store, where `loom serve --conversations` keeps it)."
)


def default_conversations() -> Path:
    """``conversations.sqlite`` beside a local store (for an s3:// store, in Loom's user data
    folder): the default of ``loom serve --conversations`` and of ``--db`` here."""
    from loom.config import settings
    from loom.conversations import CONVERSATIONS_FILE
    from loom.serve.requestlog import default_log_path

    return default_log_path(settings().store_root, CONVERSATIONS_FILE)


def _open(db: str | None) -> ConversationStore:
    from loom.conversations import open_store
    from loom.conversations.store import DEFAULT_MAX_MESSAGES, DEFAULT_MAX_SESSIONS

    where = db or str(default_conversations())
    if "://" not in where and not Path(where).expanduser().is_file():
        raise LoomError(
            f"conversations database {where} does not exist; give the one `loom serve --conversations` "
            "uses with --db"
        )
    return open_store(where, max_sessions=DEFAULT_MAX_SESSIONS, max_messages=DEFAULT_MAX_MESSAGES)


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@app.command("ls")
def ls(
    db: str | None = _O(None, "--db", help=DB_HELP),
    as_json: bool = _O(False, "--json"),
) -> None:
    """Every session (of every API key), most recently updated first."""
    store = _open(db)
    try:
        infos = store.list(None)
    finally:
        store.close()
    if as_json:
        print_json(infos)
        return
    table = Table("session", "key", "model", "messages", "updated (UTC)", "first message")
    for i in infos:
        model = i.model or "(base)"
        table.add_row(i.session_id, i.owner[:8] or "-", model, str(i.messages), _when(i.updated), i.preview)
    console.print(table)


@app.command("export")
def export(
    session_id: str = typer.Argument(..., help="The session id (sess-...)."),
    out: Path | None = _O(None, "-o", "--out", help="JSON file to write (default: standard output)."),
    db: str | None = _O(None, "--db", help=DB_HELP),
) -> None:
    """Write a session as a loom.conversation JSON document (format: loom.conversations.io)."""
    from loom.conversations.io import export_session, write_document

    store = _open(db)
    try:
        session = store.get(session_id, None)
    finally:
        store.close()
    if session is None:
        raise LoomError(f"no session {session_id!r} in the conversations database; see loom conversations ls")
    doc = export_session(session)
    if out is None:
        print_json(doc)
        return
    write_document(doc, out)
    console.print(f"exported {session_id} ({len(session.messages)} messages) to {out}")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A loom.conversation JSON document (loom conversations export)."),
    key_env: str = _O(
        "LOOM_API_KEY",
        "--key-env",
        help="Environment variable with the API key the session will belong to (unset or empty: a "
        "server without keys).",
    ),
    keep_id: bool = _O(False, "--keep-id", help="Keep the document's session id (restoring a backup)."),
    db: str | None = _O(None, "--db", help=DB_HELP),
    as_json: bool = _O(False, "--json"),
) -> None:
    """Add the session in FILE to the database, owned by the key in --key-env; prints its id."""
    from loom.conversations import owner_id
    from loom.conversations.io import import_session, read_document

    doc = read_document(file)
    key = os.environ.get(key_env) or None
    session = import_session(doc, owner_id(key), keep_id=keep_id)
    total = len(session.messages)
    store = _open(db)
    try:
        stored = store.put(session)
    finally:
        store.close()
    dropped = total - len(stored.messages)
    if as_json:
        print_json(
            {"session_id": stored.session_id, "messages": len(stored.messages), "dropped_messages": dropped}
        )
        return
    owner = f"the key in ${key_env}" if key else "no key (a server without LOOM_API_KEY)"
    console.print(
        f"imported {stored.session_id} ({len(stored.messages)} messages) for {owner}", highlight=False
    )
    if dropped:
        err_console.print(f"note: the {dropped} oldest messages were dropped (a session keeps the latest)")


@app.command("rm")
def rm(
    session_id: str = typer.Argument(..., help="The session id (sess-...)."),
    db: str | None = _O(None, "--db", help=DB_HELP),
) -> None:
    """Delete a session and its messages."""
    store = _open(db)
    try:
        deleted = store.delete(session_id, None)
    finally:
        store.close()
    if not deleted:
        raise LoomError(f"no session {session_id!r} in the conversations database; see loom conversations ls")
    console.print(f"deleted {session_id}")
