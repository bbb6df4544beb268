"""Conversations that survive restarts: ``/chat`` sessions in a database.

- :mod:`.types`: sessions, messages, context files; :func:`new_session_id`, :func:`owner_id`.
- :mod:`.store`: the :class:`ConversationStore` interface and :func:`open_store` (a SQLAlchemy
  URL or a SQLite path; the default implementation is :mod:`.sql`).
- :mod:`.trimming`: the prompt of a turn, trimmed to the model's context with its tokenizer.
- :mod:`.io`: the JSON export format (``loom.conversation``, versioned).

Default database: ``conversations.sqlite`` beside the store (``loom serve --conversations``,
``loom conversations --db``); PostgreSQL (one database for several replicas) is another URL,
``postgresql+psycopg://user:PASSWORD@host/db``.
"""

from loom.conversations.store import CONVERSATIONS_FILE, ConversationStore, database_url, open_store
from loom.conversations.types import ContextFile, Message, Session, SessionInfo, new_session_id, owner_id

__all__ = [
    "CONVERSATIONS_FILE",
    "ContextFile",
    "ConversationStore",
    "Message",
    "Session",
    "SessionInfo",
    "database_url",
    "new_session_id",
    "open_store",
    "owner_id",
]
