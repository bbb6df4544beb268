"""The conversation store interface, and opening one from what ``--conversations`` says.

A store is anything with the methods of :class:`ConversationStore`; the default,
:class:`loom.conversations.sql.SQLConversationStore`, takes any SQLAlchemy URL. ``owner`` is
how sessions stay private to the API key that started them: every call a server makes passes
the caller's :func:`loom.conversations.types.owner_id`, and a session of another owner reads
as no session at all. ``owner=None`` is the operator's view (``loom conversations``), which
sees every session; the HTTP routes never pass it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from loom.conversations.types import Message, Session, SessionInfo

CONVERSATIONS_FILE = "conversations.sqlite"
DEFAULT_MAX_SESSIONS = 1000  # per API key; its least recently updated go first
DEFAULT_MAX_MESSAGES = 40  # per session; the oldest go first
MEMORY = "memory"  # --conversations memory: kept only while the process lives (tests, demos)


class ConversationStore(Protocol):
    max_messages: int

    def get(self, session_id: str, owner: str | None) -> Session | None:
        """The session with its messages (oldest first), or None when it does not exist for ``owner``."""
        ...

    def list(self, owner: str | None) -> list[SessionInfo]:
        """The sessions of ``owner``, most recently updated first."""
        ...

    def append(self, session: Session, messages: Sequence[Message]) -> bool:
        """Add ``messages`` to ``session`` in one transaction, creating it (from its id, owner,
        model and context files) when new; the oldest messages beyond ``max_messages`` go, and the
        owner's least recently updated sessions beyond the session limit. False, writing nothing,
        when the id belongs to another owner."""
        ...

    def put(self, session: Session) -> Session:
        """Store a whole session (an import) under its id, keeping its latest ``max_messages``;
        raises LoomError when the id is taken."""
        ...

    def delete(self, session_id: str, owner: str | None) -> bool: ...

    def close(self) -> None: ...


def database_url(where: str | Path | None) -> str:
    """A SQLAlchemy URL from ``--conversations``: a URL as is, a path as a SQLite file, None or
    ``memory`` as an in-memory database."""
    if where is None or str(where) == MEMORY:
        return "sqlite://"
    text = str(where)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    return f"sqlite:///{path}"


def open_store(where: str | Path | None, *, max_sessions: int, max_messages: int) -> ConversationStore:
    """The default store at ``where`` (see :func:`database_url`); raises LoomError naming the
    URL (password hidden) and the fix when it cannot be opened."""
    from loom.conversations.sql import SQLConversationStore

    return SQLConversationStore(database_url(where), max_sessions=max_sessions, max_messages=max_messages)
