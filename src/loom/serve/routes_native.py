"""Native routes existing deployments call: /generate, /chat (+ /chat/stream) with per-session
conversations (stored by loom.conversations; /conversation* routes in loom.serve.conversations),
/health and /info."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from loom import __version__
from loom.conversations import Session
from loom.engine import SamplingParams
from loom.serve.auth import require_key
from loom.serve.conversations import chat_job, exchange, open_session, save, save_cut_off
from loom.serve.errors import APIError
from loom.serve.pools import take_rows
from loom.serve.prompts import text_prompt_ids
from loom.serve.registry import Target
from loom.serve.requestlog import new_response_id
from loom.serve.schemas import ChatRequest, GenerateRequest
from loom.serve.service import Job, Service, resolve_target, service_of
from loom.serve.sse import event, streaming
from loom.serve.stamp import Stamp, stamp_for

router = APIRouter()


def _one_model(agent: str | None, adapter: str | None) -> str | None:
    if agent and adapter:
        raise APIError(400, "give either agent or adapter, not both", param="adapter")
    return agent or adapter


async def _target(request: Request, agent: str | None, adapter: str | None) -> Target:
    return await resolve_target(request, _one_model(agent, adapter))


def _answer(job: Job, completion: Any, stamp: Stamp, **extra: Any) -> dict[str, Any]:
    generated = len(completion.token_ids)
    return {
        "response_id": stamp.response_id,
        **extra,
        "model": job.target.model,
        "model_version": stamp.version,  # the adapter version that answered, else the base's
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": len(job.ids),
            "completion_tokens": generated,
            "total_tokens": len(job.ids) + generated,
        },
        "time_to_first_token_s": completion.time_to_first_token_s,
        "total_s": round(completion.total_s, 4),
    }


@router.post("/generate", dependencies=[Depends(require_key)])
async def generate(body: GenerateRequest, request: Request, response: Response) -> dict[str, Any]:
    service = service_of(request)
    target = await _target(request, body.agent, body.adapter)
    stamp = stamp_for(request, target, new_response_id("gen"), body.prompt)
    params = SamplingParams(
        max_new_tokens=body.max_tokens or service.cfg.default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop,
    )
    engine, _ = service.ready()

    def build() -> Job:  # in a worker thread: tokenizing a long prompt must not stall the loop
        ids = text_prompt_ids(engine.tokenizer, body.prompt)
        return service.job(ids, target, params, body.max_tokens is not None)

    job = await asyncio.to_thread(build)
    grant = await take_rows(request, job.target, 1, service.admit())
    try:
        (done,) = await service.run(request, [job])
    finally:
        grant.release()
    stamp.done(done.text)
    stamp.apply(response)
    return _answer(job, done, stamp, text=done.text)


async def _chat_job(service: Service, body: ChatRequest, request: Request) -> tuple[Job, Session, int, Stamp]:
    _one_model(body.agent, body.adapter)
    session = await open_session(request, body)
    target = await resolve_target(request, session.model)
    said: dict[str, Any] = {"message": body.message, **({"context": body.context} if body.context else {})}
    if body.context_files:
        said["context_files"] = [f.name for f in body.context_files]
    stamp = stamp_for(request, target, new_response_id("chat"), said)
    job, trimmed = await asyncio.to_thread(chat_job, service, target, session, body)
    return job, session, trimmed, stamp


@router.post("/chat", dependencies=[Depends(require_key)])
async def chat(body: ChatRequest, request: Request, response: Response) -> dict[str, Any]:
    service = service_of(request)
    job, session, trimmed, stamp = await _chat_job(service, body, request)
    grant = await take_rows(request, job.target, 1, service.admit())
    try:
        (done,) = await service.run(request, [job])
    finally:
        grant.release()
    await save(service.conversations, session, exchange(body.message, done.text))
    stamp.done(done.text)
    stamp.apply(response)
    extra = {"session_id": session.session_id, "response": done.text, "trimmed_turns": trimmed}
    return _answer(job, done, stamp, **extra)


@router.post("/chat/stream", dependencies=[Depends(require_key)], response_model=None)
async def chat_stream(body: ChatRequest, request: Request) -> Response:
    """Deltas, then the answer (``done``: true). The exchange is saved when the answer is
    complete, or marked incomplete with the text so far when the stream is cut off."""
    service = service_of(request)
    job, session, trimmed, stamp = await _chat_job(service, body, request)
    store, sid = service.conversations, session.session_id
    grant = await take_rows(request, job.target, 1, service.admit())

    async def events() -> AsyncIterator[bytes]:
        texts, saving = [""], False
        try:
            with stamp.streaming(texts):
                async for piece in service.stream(job):
                    texts[0] += piece.text
                    if piece.text:
                        yield event({"session_id": sid, "delta": piece.text})
                    if piece.finished and piece.completion is not None:
                        text = texts[0] = piece.completion.text
                        saving = True  # from here the complete exchange is saved, never a cut-off copy
                        await save(store, session, exchange(body.message, text))
                        grant.release()  # the engine work is done: a slow reader must not hold a queue place
                        extra = {"session_id": sid, "response": text, "trimmed_turns": trimmed, "done": True}
                        yield event(_answer(job, piece.completion, stamp, **extra))
        finally:
            if not saving:
                save_cut_off(store, session, exchange(body.message, texts[0], incomplete=True))

    response = streaming(grant, events(), done=False)
    stamp.apply(response)  # the headers go out before the first event
    return response


@router.get("/health", response_model=None)
async def health(request: Request) -> Response:
    service = service_of(request)
    body: dict[str, Any] = {"status": service.status}
    if service.error:
        body["error"] = service.error
    return JSONResponse(body, status_code=200 if service.status == "ok" else 503)


@router.get("/info", dependencies=[Depends(require_key)])
async def info(request: Request) -> dict[str, Any]:
    service = service_of(request)
    cfg = service.cfg
    out: dict[str, Any] = {"loom_version": __version__, "status": service.status, "time": time.time()}
    engine = service.engine
    if engine is not None:
        stats = engine.stats()
        name, _, version = (engine.base_ref or "").partition("@")
        out |= {
            "base": {
                "ref": engine.base_ref,
                "name": name,
                "version": version or None,
                "fingerprint": engine.base_fingerprint,
            },
            "device": stats["device"],
            "dtype": stats["dtype"],
            "resident_adapters": stats["resident_adapters"],
            "engine": {k: stats[k] for k in ("queue_depth", "batch_size", "kv_cache_slots", "max_seq_len")},
        }
    out["limits"] = {
        "max_batch_size": engine.config.max_batch_size if engine else cfg.max_batch_size,
        "max_queue": cfg.max_queue,
        "max_body_bytes": cfg.max_body_bytes,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "request_timeout_s": cfg.request_timeout_s,
        "default_max_tokens": cfg.default_max_tokens,
        "auth": cfg.api_key is not None,
    }
    out["plan"] = service.plan.describe() if service.plan else None
    if service.plan is not None:  # why fp32 or bf16 (on a CPU measured: loom.models.dtype_probe)
        out["dtype_reason"] = service.plan.dtype_reason
    return out
