"""Per-session chat history for ``POST /chat``: bounded in sessions (LRU) and in messages.

Session ids are made here, never by clients, and are unguessable (``secrets``); each session
belongs to the API key that started it, and to any other key it does not exist."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Session:
    owner: str  # loom.serve.auth.key_id of the key that started it ("" on a server without keys)
    messages: list[dict[str, str]] = field(default_factory=list)


class Conversations:
    def __init__(self, max_sessions: int, max_messages: int) -> None:
        self.max_sessions, self.max_messages = max_sessions, max_messages
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return f"sess-{secrets.token_urlsafe(24)}"  # 192 random bits

    def _get(self, session_id: str, owner: str) -> Session | None:
        session = self.sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.owner, owner):
            return None  # another key's session is indistinguishable from none at all
        self.sessions.move_to_end(session_id)
        return session

    def history(self, session_id: str, owner: str) -> list[dict[str, str]] | None:
        session = self._get(session_id, owner)
        return None if session is None else session.messages

    def append(self, session_id: str, owner: str, *messages: dict[str, str]) -> None:
        """Add turns to a session of ``owner`` (made here when new or expired meanwhile)."""
        session = self._get(session_id, owner)
        if session is None:
            if session_id in self.sessions:
                return  # the id is another key's: never write into it
            session = self.sessions[session_id] = Session(owner)
        session.messages.extend(messages)
        del session.messages[: max(0, len(session.messages) - self.max_messages)]  # keep the latest
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)

    def delete(self, session_id: str, owner: str) -> bool:
        if self._get(session_id, owner) is None:
            return False
        del self.sessions[session_id]
        return True
