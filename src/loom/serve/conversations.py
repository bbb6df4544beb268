"""The server's side of conversations (loom.conversations): opening a /chat session for the
calling key, building its prompt within the context, saving its exchanges, and the routes a
client manages its sessions with.

Session ids are made by the server, never by clients, and are unguessable; each session belongs
to the API key that started it, and to any other key it does not exist (404, the same as an id
never made). Store calls run on worker threads: the database may be a network away.

Saving: a /chat exchange (the user's message and the answer) is one transaction, committed when
the answer is complete. /chat/stream commits the same way when the answer is complete; a stream
cut off before that (client gone, error, shutdown) commits the message with the answer so far
marked ``incomplete``. A process killed mid-stream (SIGKILL, power) leaves no trace of that turn.

Routes: GET/DELETE /conversation?session_id=, GET /conversations, POST /conversation/import,
GET /conversation/export?session_id= (bodies in loom.serve.schemas).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request

from loom.conversations import ContextFile, ConversationStore, Message, Session, new_session_id
from loom.conversations.io import export_session, import_session
from loom.conversations.sql import ConversationStoreError
from loom.conversations.trimming import fit, system_text
from loom.engine import SamplingParams
from loom.serve.auth import key_id, require_key
from loom.serve.errors import APIError, server_error
from loom.serve.registry import Target
from loom.serve.schemas import (
    ChatRequest,
    Conversation,
    ConversationDeleted,
    ConversationImport,
    ConversationImported,
    ConversationList,
    ConversationMessage,
    ConversationSummary,
    SessionId,
)
from loom.serve.service import Job, Service, service_of

log = logging.getLogger("loom.serve")
router = APIRouter()
T = TypeVar("T")


def no_session(session_id: str) -> APIError:
    return APIError(
        404,
        f"no conversation {session_id!r} for this API key (it may have expired); omit session_id "
        "to start a new one (the server makes the id)",
        "not_found_error",
        "session_not_found",
        "session_id",
    )


async def _call(fn: Callable[..., T], *args: Any) -> T:
    """A store call on a worker thread; a failing database is the server's 500, not the caller's."""
    try:
        return await asyncio.to_thread(fn, *args)
    except ConversationStoreError as exc:
        raise server_error("the conversation database failed", "conversation_store_error", exc) from None


def _store(request: Request) -> ConversationStore:
    return service_of(request).conversations


# ------------------------------------------------------------------ /chat
async def open_session(request: Request, body: ChatRequest) -> Session:
    """The session this message belongs to: a new one of the caller's key (not stored until its
    first exchange is), or the caller's existing one with its history."""
    owner = key_id(request)
    if body.session_id is None:
        files = [ContextFile(f.name, f.text) for f in body.context_files or []]
        return Session(new_session_id(), owner, body.agent or body.adapter, files)
    if body.context_files:
        raise APIError(
            400,
            "context_files are given when a session starts and kept for it; omit them when "
            "continuing a session, or start a new one (omit session_id)",
            param="context_files",
        )
    found = await _call(_store(request).get, body.session_id, owner)
    if found is None:
        raise no_session(body.session_id)
    asked = body.agent or body.adapter
    if asked is not None and asked != found.model:
        raise APIError(
            400,
            f"session {body.session_id} talks to {found.model or 'the base'}, chosen when it started, "
            f"not {asked}; omit agent/adapter to continue it, or start a new session",
            code="session_model_mismatch",
            param="agent" if body.agent else "adapter",
        )
    return found


def chat_job(service: Service, target: Target, session: Session, body: ChatRequest) -> tuple[Job, int]:
    """The checked job of one turn and how many of the oldest turns were left out of its prompt.
    Runs on a worker thread (tokenizing a long history must not stall the loop)."""
    engine, _ = service.ready()
    max_len = engine.max_len
    if body.max_tokens:  # the prompt must leave exactly this much room, or the job is refused
        room = max_len - body.max_tokens
    else:  # room for a default-length answer, but a long history may take half the context
        room = max(max_len - service.cfg.default_max_tokens, max_len // 2)
    system = system_text(target.system, session.context_files, body.context)
    fitted = fit(
        [{"role": "system", "content": system}] if system else [],
        [m.chat() for m in session.messages],
        [{"role": "user", "content": body.message}],
        service.tokenize,
        min(service.prompt_limit(), room),
    )
    params = SamplingParams(
        max_new_tokens=body.max_tokens or service.cfg.default_max_tokens, temperature=body.temperature
    )
    return service.job(fitted.ids, target, params, body.max_tokens is not None), fitted.trimmed_turns


def exchange(message: str, answer: str, incomplete: bool = False) -> list[Message]:
    return [Message("user", message), Message("assistant", answer, incomplete=incomplete)]


async def save(store: ConversationStore, session: Session, messages: Sequence[Message]) -> None:
    """Commit an exchange; shielded, so a client leaving meanwhile cannot leave it half-known."""
    await asyncio.shield(_call(store.append, session, messages))


def save_cut_off(store: ConversationStore, session: Session, messages: Sequence[Message]) -> None:
    """Commit a cut-off exchange from a stream's ``finally``: on a worker thread (a database write
    never stalls the event loop), not awaited (the task may be cancelled); a failure is logged,
    never raised over the cause."""

    def write() -> None:
        try:
            store.append(session, messages)
        except Exception as exc:
            log.error("the cut-off turn of session %s was not saved: %s", session.session_id, exc)

    future = _CUT_OFF.submit(write)
    _PENDING.add(future)
    future.add_done_callback(_PENDING.discard)


def flush_cut_offs(timeout_s: float = 10.0) -> None:
    """Wait for cut-off turns still being written (a server closes its store after this)."""
    wait(list(_PENDING), timeout=timeout_s)


_CUT_OFF = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loom-conversation-save")
_PENDING: set[Future[None]] = set()


# ------------------------------------------------------------------ managing sessions
@router.get("/conversation", dependencies=[Depends(require_key)])
async def get_conversation(request: Request, session_id: SessionId = Query(...)) -> Conversation:
    session = await _call(_store(request).get, session_id, key_id(request))
    if session is None:
        raise no_session(session_id)
    return Conversation(
        session_id=session.session_id,
        model=session.model,
        context_files=[f.name for f in session.context_files],
        messages=[
            ConversationMessage(role=m.role, content=m.content, time=m.time, incomplete=m.incomplete)
            for m in session.messages
        ],
    )


@router.delete("/conversation", dependencies=[Depends(require_key)])
async def delete_conversation(request: Request, session_id: SessionId = Query(...)) -> ConversationDeleted:
    if not await _call(_store(request).delete, session_id, key_id(request)):
        raise no_session(session_id)
    return ConversationDeleted(session_id=session_id, deleted=True)


@router.get("/conversations", dependencies=[Depends(require_key)])
async def list_conversations(request: Request) -> ConversationList:
    infos = await _call(_store(request).list, key_id(request))
    return ConversationList(
        sessions=[
            ConversationSummary(
                session_id=i.session_id,
                model=i.model,
                created=i.created,
                updated=i.updated,
                messages=i.messages,
                preview=i.preview,
            )
            for i in infos
        ]
    )


@router.get("/conversation/export", dependencies=[Depends(require_key)])
async def export_conversation(request: Request, session_id: SessionId = Query(...)) -> dict[str, Any]:
    """The session as a ``loom.conversation`` document (loom.conversations.io)."""
    session = await _call(_store(request).get, session_id, key_id(request))
    if session is None:
        raise no_session(session_id)
    return export_session(session).model_dump(mode="json")


@router.post("/conversation/import", dependencies=[Depends(require_key)])
async def import_conversation(body: ConversationImport, request: Request) -> ConversationImported:
    """A new session of the caller's key from an exported document (a new id: clients never
    choose ids); the oldest messages beyond the server's limit are dropped and counted."""
    session = import_session(body, key_id(request))
    total = len(session.messages)
    stored = await _call(_store(request).put, session)
    kept = len(stored.messages)
    return ConversationImported(session_id=stored.session_id, messages=kept, dropped_messages=total - kept)
