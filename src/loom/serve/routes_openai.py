"""OpenAI-compatible routes (as vLLM and LoRAX serve them): chat and text completions, the model
list, and vLLM's runtime LoRA load/unload."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loom.engine import SamplingParams
from loom.engine.types import Completion, LogitsProcessor
from loom.errors import LoomError
from loom.serve.auth import require_admin, require_key
from loom.serve.errors import APIError
from loom.serve.pools import Grant, take_rows
from loom.serve.prompts import text_prompt_ids
from loom.serve.registry import Target
from loom.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    SamplingFields,
    UnloadLoraRequest,
)
from loom.serve.service import Job, Service, resolve_target, service_of
from loom.serve.sse import DONE, event, merge, streaming
from loom.serve.stamp import Stamp, stamp_for

router = APIRouter()


def sampling(body: SamplingFields, default_max: int, choice: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max,
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=None if body.seed is None else body.seed + choice,  # n choices must differ
        repetition_penalty=body.repetition_penalty or 1.0,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
    )


def usage(jobs: list[Job], completions: list[Completion]) -> dict[str, int]:
    prompt = sum(len(j.ids) for j in {j.prompt_index: j for j in jobs}.values())  # each prompt once
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def fingerprint(service: Service, completions: list[Completion]) -> str | None:
    """The exact model version that answered (feedback points at it): adapter or base."""
    adapter = next((c.adapter for c in completions if c.adapter), None)
    return adapter or (service.engine.base_ref if service.engine else None)


def build_jobs(
    service: Service,
    prompts: list[Any],
    target: Target,
    body: SamplingFields,
    processor: Callable[[], LogitsProcessor] | None = None,
) -> list[Job]:
    given = body.max_tokens is not None or body.max_completion_tokens is not None
    if len(prompts) * body.n > service.capacity:  # could never be admitted: not a retryable 429
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={body.n} generations exceed this server's capacity "
            f"of {service.capacity}; send fewer at once",
            param="n",
        )
    jobs: list[Job] = []
    engine, _ = service.ready()
    for index, prompt in enumerate(prompts):
        ids: Any = text_prompt_ids(engine.tokenizer, prompt) if isinstance(prompt, str) else prompt
        for i in range(body.n):
            params = sampling(body, service.cfg.default_max_tokens, i)
            job = service.job(ids, target, params, given, processor() if processor else None)
            job.prompt_index = index
            ids = job.ids  # tokenize each prompt once
            jobs.append(job)
    return jobs


@router.post("/v1/chat/completions", dependencies=[Depends(require_key)], response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    service = service_of(request)
    engine, _registry = service.ready()
    target = await resolve_target(request, body.model)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    if target.system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": target.system})
    processor = await asyncio.to_thread(_response_format, engine, body)
    jobs = await asyncio.to_thread(build_jobs, service, [messages], target, body, processor)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stamp = stamp_for(request, target, rid, {"messages": messages})

    def result(done: list[Completion]) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]

    def stream(include_usage: bool, admission: Grant) -> AsyncIterator[bytes]:
        return _chat_stream(service, jobs, target, stamp, created, include_usage, admission)

    head = {"id": rid, "object": "chat.completion", "created": created, "model": target.model}
    return await _respond(request, service, jobs, body, head, result, stream, stamp)


async def _respond(
    request: Request,
    service: Service,
    jobs: list[Job],
    body: SamplingFields,
    head: dict[str, Any],
    choices: Callable[[list[Completion]], list[dict[str, Any]]],
    stream: Callable[[bool, Grant], AsyncIterator[bytes]],
    stamp: Stamp,
) -> Response:
    """Admit the jobs and give them batch rows, then stream them as SSE or answer once with
    every choice and usage. The response id (``id``) and the answering version go in the
    headers, before a stream's first byte."""
    admission = service.admit(len(jobs))
    grant = await take_rows(request, jobs[0].target, len(jobs), admission)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response = streaming(grant, stream(include_usage, grant), done=True)
        stamp.apply(response)
        return response
    try:
        done = await service.run(request, jobs)
    finally:
        grant.release()
    stamp.done([c.text for c in done])
    fp = fingerprint(service, done)
    return JSONResponse(
        {
            **head,
            "system_fingerprint": fp,
            "model_version": stamp.version,
            "choices": choices(done),
            "usage": usage(jobs, done),
        },
        headers=stamp.headers(),
    )


def _response_format(engine: Any, body: ChatCompletionRequest) -> Callable[[], LogitsProcessor] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    schema = None
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(
                400, "response_format json_schema needs json_schema.schema", param="response_format"
            )
        schema = fmt.json_schema.schema_
    try:
        engine.json_processor(schema)  # compile once here, so a bad schema is a 400 before anything runs
    except Exception as exc:
        raise APIError(
            400, f"response_format: the JSON schema cannot be compiled: {exc}", param="response_format"
        ) from None
    return lambda: engine.json_processor(schema)


async def _chat_stream(
    service: Service,
    jobs: list[Job],
    target: Target,
    stamp: Stamp,
    created: int,
    include_usage: bool,
    admission: Grant,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return event(
            {
                "id": stamp.response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": target.model,
                "model_version": stamp.version,
                "choices": choices,
                **extra,
            }
        )

    for i in range(len(jobs)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    finished: list[Completion] = []
    texts = [""] * len(jobs)
    with stamp.streaming(texts):
        async for i, piece in merge([service.stream(job) for job in jobs]):
            texts[i] += piece.text
            if piece.text:
                yield chunk([{"index": i, "delta": {"content": piece.text}, "finish_reason": None}])
            if piece.finished and piece.completion is not None:
                finished.append(piece.completion)
                texts[i] = piece.completion.text
                yield chunk(
                    [{"index": i, "delta": {}, "finish_reason": piece.completion.finish_reason}],
                    system_fingerprint=fingerprint(service, [piece.completion]),
                )
    admission.release()  # the engine work is done: a slow reader must not hold a queue place
    if include_usage:
        yield chunk([], usage=usage(jobs, finished))
    yield DONE


@router.post("/v1/completions", dependencies=[Depends(require_key)], response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    service = service_of(request)
    engine, _registry = service.ready()
    target = await resolve_target(request, body.model)
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt is empty; give text or token ids", param="prompt")
    jobs = await asyncio.to_thread(build_jobs, service, prompts, target, body)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stamp = stamp_for(request, target, rid, prompt if isinstance(prompt, str) else {"prompt": prompts})
    # A text prompt is echoed as sent (its ids may carry a BOS the client never wrote).
    echo = [
        ""
        if not body.echo
        else p
        if isinstance(p := prompts[j.prompt_index], str)
        else engine.tokenizer.decode(j.ids)
        for j in jobs
    ]

    def result(done: list[Completion]) -> list[dict[str, Any]]:
        return [
            {"index": i, "text": echo[i] + c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(done)
        ]

    def stream(include_usage: bool, admission: Grant) -> AsyncIterator[bytes]:
        return _text_stream(service, jobs, target, stamp, created, include_usage, echo, admission)

    head = {"id": rid, "object": "text_completion", "created": created, "model": target.model}
    return await _respond(request, service, jobs, body, head, result, stream, stamp)


async def _text_stream(
    service: Service,
    jobs: list[Job],
    target: Target,
    stamp: Stamp,
    created: int,
    include_usage: bool,
    echo: list[str],
    admission: Grant,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return event(
            {
                "id": stamp.response_id,
                "object": "text_completion",
                "created": created,
                "model": target.model,
                "model_version": stamp.version,
                "choices": choices,
                **extra,
            }
        )

    for i, text in enumerate(echo):
        if text:
            yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
    finished: list[Completion] = []
    texts = [""] * len(jobs)
    with stamp.streaming(texts):
        async for i, piece in merge([service.stream(job) for job in jobs]):
            texts[i] += piece.text
            reason = piece.completion.finish_reason if piece.finished and piece.completion else None
            if piece.text or reason:
                yield chunk([{"index": i, "text": piece.text, "logprobs": None, "finish_reason": reason}])
            if piece.completion is not None:
                finished.append(piece.completion)
                texts[i] = piece.completion.text
    admission.release()  # the engine work is done: a slow reader must not hold a queue place
    if include_usage:
        yield chunk([], usage=usage(jobs, finished))
    yield DONE


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(request: Request) -> dict[str, Any]:
    _engine, registry = service_of(request).ready()
    return {"object": "list", "data": await asyncio.to_thread(registry.models)}


@router.post("/v1/load_lora_adapter", dependencies=[Depends(require_admin)])
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    service = service_of(request)
    engine, registry = service.ready()
    # a store ref only (paths never reach the engine); resolving may read the store: off the loop
    target = await asyncio.to_thread(registry.resolve, body.lora_path)
    if target.adapter is None:
        raise APIError(400, f"lora_path {body.lora_path!r} names the base, not an adapter", param="lora_path")
    if body.lora_name in registry.agents or body.lora_name == registry.base_name:
        raise APIError(
            400,
            f"lora_name {body.lora_name!r} is taken by an agent or the base; pick another",
            param="lora_name",
        )
    try:
        key = await asyncio.to_thread(engine.load_adapter, target.adapter)
    except LoomError:
        service.metrics.preload_failures.inc()
        raise
    with registry.lock:
        registry.dynamic[body.lora_name] = key
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully ({key}).")


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_admin)])
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    engine, registry = service_of(request).ready()
    with registry.lock:
        key = registry.dynamic.get(body.lora_name)
    if key is None:
        raise APIError(
            404,
            f"no LoRA adapter named {body.lora_name!r} was loaded with /v1/load_lora_adapter",
            "not_found_error",
            "lora_not_found",
            "lora_name",
        )
    await asyncio.to_thread(engine.unload_adapter, key)
    with registry.lock:
        registry.dynamic.pop(body.lora_name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
