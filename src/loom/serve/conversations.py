"""Per-session chat history for ``POST /chat``: bounded in sessions (LRU) and in messages."""

from __future__ import annotations

import uuid
from collections import OrderedDict


class Conversations:
    def __init__(self, max_sessions: int, max_messages: int) -> None:
        self.max_sessions, self.max_messages = max_sessions, max_messages
        self.sessions: OrderedDict[str, list[dict[str, str]]] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return f"sess-{uuid.uuid4().hex[:16]}"

    def history(self, session_id: str) -> list[dict[str, str]] | None:
        messages = self.sessions.get(session_id)
        if messages is not None:
            self.sessions.move_to_end(session_id)
        return messages

    def append(self, session_id: str, *messages: dict[str, str]) -> None:
        history = self.sessions.setdefault(session_id, [])
        self.sessions.move_to_end(session_id)
        history.extend(messages)
        del history[: max(0, len(history) - self.max_messages)]  # keep the latest turns
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)

    def delete(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None
