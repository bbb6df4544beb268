"""The plain data a conversation store keeps: sessions, their messages and context files."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class ContextFile:
    """A document given at session start (e.g. a briefing in Markdown), sent by value: the server
    never opens a path a client names, so ``name`` is only a label."""

    name: str
    text: str


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    time: float = field(default_factory=time.time)
    # an assistant answer cut off (client gone, error, shutdown): the text so far, marked
    incomplete: bool = False

    def chat(self) -> dict[str, str]:
        """As a chat-template message."""
        return {"role": self.role, "content": self.content}


@dataclass
class Session:
    session_id: str
    owner: str  # owner_id of the API key that started it ("" on a server without keys)
    model: str | None = None  # the agent or adapter it talks to, chosen at start (None: the base)
    context_files: list[ContextFile] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    messages: list[Message] = field(default_factory=list)


@dataclass(frozen=True)
class SessionInfo:
    """One line of a listing: no message bodies beyond a preview of the first question."""

    session_id: str
    owner: str
    model: str | None
    created: float
    updated: float
    messages: int
    preview: str


def new_session_id() -> str:
    """Made by the server, never by clients, and unguessable: 192 random bits."""
    return f"sess-{secrets.token_urlsafe(24)}"


def owner_id(token: str | None) -> str:
    """Who owns a session: a digest of the caller's bearer token (never the token itself), or ""
    when the server has no keys. The server and ``loom conversations import`` both use this."""
    return "" if not token else hashlib.sha256(token.encode()).hexdigest()[:32]
