"""Every SDK call as data: the request to send, how to read the answer, and how it may fail over.
The sync and async clients execute the same :class:`Call` objects, so each route is written once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import httpx
from pydantic import BaseModel
from typing_extensions import TypedDict, Unpack

from loom.client.results import (
    AdminReply,
    AgentInfo,
    AgentRun,
    Answer,
    ChatReply,
    Conversation,
    ConversationSummary,
    Deleted,
    FeedbackReceipt,
    Generation,
    Health,
    Info,
    ModelCard,
    Pool,
)

T = TypeVar("T")
A = TypeVar("A", bound=Answer)
M = TypeVar("M", bound=BaseModel)
# The server's response headers (loom.serve.requestlog names them; the SDK does not import the server).
RESPONSE_ID_HEADER = "X-Loom-Response-Id"
MODEL_VERSION_HEADER = "X-Loom-Model-Version"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: Any  # parsed JSON, else the text
    endpoint: str


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Reply], T]
    json: Any = None
    params: dict[str, Any] | None = None
    admin: bool = False  # sent with the admin key (pools, adapter loading)
    prefer: str | None = None  # try this endpoint first (the one that logged a response)
    session: str | None = None  # the conversation this call is about: its server goes first
    pin: str | None = None  # only this endpoint
    timeout: float | None = None
    retry_unsafe: bool = False
    accept: frozenset[int] = field(default_factory=frozenset)  # error statuses parsed as answers
    stream: Literal["chat", "text"] | None = None

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "HEAD", "DELETE")


class CallOptions(TypedDict, total=False):
    timeout: float  # seconds for this call (connect, each read); default: the client's
    retry_unsafe: bool  # re-send to the next endpoint even when the request may have run
    endpoint: str  # send to this endpoint only


class GenerateArgs(CallOptions, total=False):
    adapter: str
    agent: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int


class CompletionArgs(CallOptions, total=False):
    model: str  # the base, an adapter (name or name@version) or an agent
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int


class ChatArgs(CallOptions, total=False):
    session_id: str  # from an earlier reply: continue that conversation
    context: str  # this turn only
    context_files: list[dict[str, str]]  # [{"name", "text"}], sent by value; only when a session starts
    agent: str
    adapter: str
    max_tokens: int
    temperature: float


def _split(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request body's fields, the Call's options) from a method's keyword arguments."""
    opts = {
        "timeout": kw.pop("timeout", None),
        "retry_unsafe": bool(kw.pop("retry_unsafe", False)),
        "pin": kw.pop("endpoint", None),
    }
    return {k: v for k, v in kw.items() if v is not None}, opts


def _stamped(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    version = body.get("model_version") or reply.headers.get(MODEL_VERSION_HEADER)
    rid = body.get("response_id") or reply.headers.get(RESPONSE_ID_HEADER)
    return {**body, "endpoint": reply.endpoint, "model_version": version, "response_id": rid}


def answer(cls: type[A]) -> Callable[[Reply], A]:
    return lambda reply: cls.model_validate(_stamped(reply, reply.body))


def _as(cls: type[M]) -> Callable[[Reply], M]:
    def parse(reply: Reply) -> M:
        return cls.model_validate({**reply.body, "endpoint": reply.endpoint})

    return parse


def _list_of(cls: type[M], key: str) -> Callable[[Reply], list[M]]:
    def parse(reply: Reply) -> list[M]:
        return [cls.model_validate({**item, "endpoint": reply.endpoint}) for item in reply.body[key]]

    return parse


# ----------------------------------------------------------------- generation
def generate(prompt: str, **kw: Unpack[GenerateArgs]) -> Call[Generation]:
    body, opts = _split(dict(kw))
    return Call("POST", "/generate", answer(Generation), json={"prompt": prompt, **body}, **opts)


def generate_stream(prompt: str, **kw: Unpack[CompletionArgs]) -> Call[Any]:
    """Streamed text completion (``/v1/completions``: the native /generate does not stream)."""
    body, opts = _split(dict(kw))
    body |= {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
    return Call("POST", "/v1/completions", lambda r: r, json=body, stream="text", **opts)


def chat(message: str, **kw: Unpack[ChatArgs]) -> Call[ChatReply]:
    body, opts = _split(dict(kw))
    session = body.get("session_id")
    return Call(
        "POST", "/chat", answer(ChatReply), json={"message": message, **body}, session=session, **opts
    )


def chat_stream(message: str, **kw: Unpack[ChatArgs]) -> Call[Any]:
    call = chat(message, **kw)
    return Call(
        "POST", "/chat/stream", lambda r: r, json=call.json, session=call.session, pin=call.pin,
        timeout=call.timeout, retry_unsafe=call.retry_unsafe, stream="chat",
    )  # fmt: skip


# ----------------------------------------------------------------- conversations
def conversation(session_id: str, **kw: Unpack[CallOptions]) -> Call[Conversation]:
    _, opts = _split(dict(kw))
    params = {"session_id": session_id}
    return Call("GET", "/conversation", _as(Conversation), params=params, session=session_id, **opts)


def delete_conversation(session_id: str, **kw: Unpack[CallOptions]) -> Call[bool]:
    _, opts = _split(dict(kw))
    params = {"session_id": session_id}
    deleted = lambda r: bool(r.body.get("deleted"))  # noqa: E731
    return Call("DELETE", "/conversation", deleted, params=params, session=session_id, **opts)


def conversations(**kw: Unpack[CallOptions]) -> Call[list[ConversationSummary]]:
    """``GET /conversations``: this key's sessions (a list under ``data``, ``conversations`` or
    ``sessions``; each an object with ``session_id`` or the bare id)."""
    _, opts = _split(dict(kw))

    def parse(reply: Reply) -> list[ConversationSummary]:
        body = reply.body
        items = body if isinstance(body, list) else next(
            (body[k] for k in ("data", "conversations", "sessions") if k in body), []
        )  # fmt: skip
        return [
            ConversationSummary.model_validate(
                {**(i if isinstance(i, dict) else {"session_id": i}), "endpoint": reply.endpoint}
            )
            for i in items
        ]

    return Call("GET", "/conversations", parse, **opts)


def export_conversation(session_id: str, **kw: Unpack[CallOptions]) -> Call[Conversation]:
    _, opts = _split(dict(kw))
    params = {"session_id": session_id}
    return Call("GET", "/conversation/export", _as(Conversation), params=params, session=session_id, **opts)


def import_conversation(conv: Conversation | dict[str, Any], **kw: Unpack[CallOptions]) -> Call[Conversation]:
    """``POST /conversation/import`` with ``{"session_id", "messages"}`` (an export, e.g. from
    another server); the answer names the session to continue with ``chat(session_id=...)``."""
    _, opts = _split(dict(kw))
    data = _document(conv.model_dump(mode="json")) if isinstance(conv, Conversation) else conv

    def parse(reply: Reply) -> Conversation:
        body = dict(reply.body)
        sent, kept = list(data.get("messages", [])), body.pop("messages", None)
        if isinstance(kept, int):  # the server answers how many it kept: the newest ones
            sent = sent[len(sent) - kept :] if kept else []
        return Conversation.model_validate({**data, **body, "messages": sent, "endpoint": reply.endpoint})

    return Call("POST", "/conversation/import", parse, json=data, **opts)


def _document(conv: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``loom.conversation`` document in an export (or a GET /conversation, whose
    ``context_files`` are names only and so are left out): the server refuses any others."""
    fields = ("format", "version", "session_id", "model", "created", "updated", "messages")
    doc = {k: conv[k] for k in fields if conv.get(k) is not None}
    files = conv.get("context_files") or []
    if all(isinstance(f, dict) for f in files):
        doc["context_files"] = files
    return doc


# ----------------------------------------------------------------- models, health, info
def models(**kw: Unpack[CallOptions]) -> Call[list[ModelCard]]:
    _, opts = _split(dict(kw))
    return Call("GET", "/v1/models", _list_of(ModelCard, "data"), **opts)


def health(**kw: Unpack[CallOptions]) -> Call[Health]:
    _, opts = _split(dict(kw))
    # pinned, a 503 is that server's answer ("loading"); unpinned, it means: ask the next one
    accept = frozenset({503}) if opts["pin"] else frozenset()
    return Call("GET", "/health", _as(Health), accept=accept, **opts)


def info(**kw: Unpack[CallOptions]) -> Call[Info]:
    _, opts = _split(dict(kw))
    return Call("GET", "/info", _as(Info), **opts)


# ----------------------------------------------------------------- feedback
def feedback(
    response: str | Answer | AgentRun,
    rating: int,
    corrected_answer: Any = None,
    comment: str | None = None,
    **kw: Unpack[CallOptions],
) -> Call[FeedbackReceipt]:
    """Feedback goes to the server that logged the response: a result object says which."""
    _, opts = _split(dict(kw))
    rid = response if isinstance(response, str) else response.response_id
    if not rid:
        raise ValueError("feedback: the result has no response_id; pass the id from X-Loom-Response-Id")
    prefer = None if isinstance(response, str) else response.endpoint or None
    body = {"response_id": rid, "rating": rating, "corrected_answer": corrected_answer, "comment": comment}
    body = {k: v for k, v in body.items() if v is not None}
    return Call("POST", "/v1/feedback", _as(FeedbackReceipt), json=body, prefer=prefer, **opts)


# ----------------------------------------------------------------- agents
def _agent_runs(reply: Reply, items: list[dict[str, Any]]) -> list[AgentRun]:
    versions = (reply.headers.get(MODEL_VERSION_HEADER) or "").split(",")
    out = []
    for i, item in enumerate(items):
        mv = item.get("model_version")
        stamped = versions[i] if i < len(versions) and versions[i] else None
        named = (mv.get("adapter") or mv.get("base")) if isinstance(mv, dict) else mv
        fields = {"versions": mv if isinstance(mv, dict) else {}, "model_version": stamped or named}
        out.append(AgentRun.model_validate({**item, **fields, "endpoint": reply.endpoint}))
    return out


def agent_run(name: str, payload: dict[str, Any], **kw: Unpack[CallOptions]) -> Call[AgentRun]:
    _, opts = _split(dict(kw))
    return Call(
        "POST",
        f"/v1/agents/{name}/run",
        lambda r: _agent_runs(r, [r.body])[0],
        json={"input": payload},
        **opts,
    )


def agent_batch(name: str, payloads: list[dict[str, Any]], **kw: Unpack[CallOptions]) -> Call[list[AgentRun]]:
    _, opts = _split(dict(kw))
    parse: Callable[[Reply], list[AgentRun]] = lambda r: _agent_runs(r, r.body["data"])  # noqa: E731
    return Call("POST", f"/v1/agents/{name}/run", parse, json={"inputs": list(payloads)}, **opts)


def agents(**kw: Unpack[CallOptions]) -> Call[list[AgentInfo]]:
    _, opts = _split(dict(kw))
    return Call("GET", "/v1/agents", _list_of(AgentInfo, "data"), **opts)


def agent(name: str, **kw: Unpack[CallOptions]) -> Call[AgentInfo]:
    _, opts = _split(dict(kw))
    return Call("GET", f"/v1/agents/{name}", _as(AgentInfo), **opts)


# ----------------------------------------------------------------- pools and adapters (admin)
def pools(**kw: Unpack[CallOptions]) -> Call[list[Pool]]:
    _, opts = _split(dict(kw))
    return Call("GET", "/workers/pools", _list_of(Pool, "pools"), **opts)


def pool_create(
    agent: str | None = None,
    adapter: str | None = None,
    base: str | None = None,
    warm_size: int = 1,
    **kw: Unpack[CallOptions],
) -> Call[Pool]:
    body, opts = _split({"agent": agent, "adapter": adapter, "base": base, "warm_size": warm_size, **kw})
    return Call("POST", "/workers/pools", _as(Pool), json=body, admin=True, **opts)


def pool_swap(pool_id: str, version: str, **kw: Unpack[CallOptions]) -> Call[Pool]:
    _, opts = _split(dict(kw))
    return Call(
        "POST", f"/workers/pool/{pool_id}/swap", _as(Pool), json={"version": version}, admin=True, **opts
    )


def pool_delete(pool_id: str, **kw: Unpack[CallOptions]) -> Call[Deleted]:
    _, opts = _split(dict(kw))
    return Call("DELETE", f"/workers/pool/{pool_id}", _as(Deleted), admin=True, **opts)


def _admin_reply(reply: Reply) -> AdminReply:
    return AdminReply(message=str(reply.body), endpoint=reply.endpoint)


def load_adapter(name: str, ref: str, **kw: Unpack[CallOptions]) -> Call[AdminReply]:
    _, opts = _split(dict(kw))
    body = {"lora_name": name, "lora_path": ref}
    return Call("POST", "/v1/load_lora_adapter", _admin_reply, json=body, admin=True, **opts)


def unload_adapter(name: str, **kw: Unpack[CallOptions]) -> Call[AdminReply]:
    _, opts = _split(dict(kw))
    return Call("POST", "/v1/unload_lora_adapter", _admin_reply, json={"lora_name": name}, admin=True, **opts)
