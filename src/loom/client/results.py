"""Typed results. Every answer from a model carries ``model_version`` (the exact adapter version
that answered, else the base's: what feedback and rollbacks point at) and ``endpoint`` (the URL
that answered). Unknown fields a newer server adds are kept, not refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), populate_by_name=True)

    endpoint: str = ""  # the URL that answered


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Answer(_Model):
    """What every model answer shares."""

    response_id: str | None = None  # give it to feedback()
    model: str | None = None
    model_version: str | None = None
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)


class Generation(Answer):
    """``POST /generate`` (and a finished :meth:`generate_stream`)."""

    text: str = ""
    time_to_first_token_s: float | None = None
    total_s: float | None = None


class ChatReply(Answer):
    """``POST /chat``: pass ``session_id`` back to continue the conversation."""

    session_id: str
    response: str = ""
    time_to_first_token_s: float | None = None
    total_s: float | None = None

    @property
    def text(self) -> str:
        return self.response


class Answered(_Model):
    step: int = 0  # 0: the agent's own model; 1...: its fallback chain
    kind: str = ""  # adapter | base | python | legacy | endpoint | stub
    ref: str | None = None
    reasons: list[str] = Field(default_factory=list)


class AgentRun(_Model):
    """One agent result (``POST /v1/agents/{name}/run``). ``versions`` is the server's
    ``{"base", "adapter"}``; ``model_version`` the one that answered (adapter, base or fallback)."""

    response_id: str | None = None
    agent: str = ""
    output: Any = None
    raw: str = ""
    model_version: str | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    latency_s: float | None = None
    fallback: Answered = Field(default_factory=Answered)
    citations: list[dict[str, Any]] = Field(default_factory=list)
    markdown: str | None = None
    confidence: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    usage: dict[str, int] = Field(default_factory=dict)
    error: str | None = None  # in a batch: every step of this payload's chain failed


class AgentInfo(_Model):
    name: str


class ModelCard(_Model):
    id: str
    owned_by: str | None = None
    root: str | None = None  # the concrete version a name resolves to now
    parent: str | None = None  # the base of an adapter or agent; None for the base


class Health(_Model):
    status: str
    error: str | None = None


class Info(_Model):
    loom_version: str | None = None
    status: str | None = None
    base: dict[str, Any] | None = None
    limits: dict[str, Any] = Field(default_factory=dict)


class Pool(_Model):
    id: str
    model: str | None = None
    adapter: str | None = None
    warm_size: int = 0
    resident: bool | None = None
    swaps: list[dict[str, Any]] = Field(default_factory=list)


class Deleted(_Model):
    id: str
    deleted: bool = True


class AdminReply(_Model):
    message: str


class FeedbackReceipt(_Model):
    id: str
    response_id: str
    rating: int
    stored: bool = True


class Conversation(_Model):
    """A session's messages: the shape of ``GET /conversation`` and of export/import."""

    session_id: str
    messages: list[dict[str, Any]] = Field(default_factory=list)


class ConversationSummary(_Model):
    session_id: str
