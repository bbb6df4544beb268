"""Where agent answers come from: Loom's engine (batched), Python entry points, and other
OpenAI-compatible endpoints (a remote Loom)."""

from __future__ import annotations

import importlib
import json
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from loom.agents.result import Generated
from loom.engine import Engine, SamplingParams
from loom.engine.request import Request
from loom.errors import LoomError


@dataclass
class ModelJob:
    prompt_ids: list[int]
    adapter: str | None  # None: the base alone
    params: SamplingParams
    schema: dict[str, Any] | None = None  # decode under this JSON schema's grammar
    json_mode: bool = False  # JSON without a schema


class EngineBackend:
    """Submits a whole batch at once so it shares decode steps (continuous batching), and
    waits for each answer up to a deadline; a late request is cancelled, the others go on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, jobs: list[ModelJob], timeout_s: float) -> list[Generated]:
        out: list[Generated | None] = [None] * len(jobs)
        reqs: list[tuple[int, Request]] = []
        for i, job in enumerate(jobs):
            try:
                reqs.append((i, self._request(job)))
            except LoomError as exc:  # unknown or incompatible adapter, prompt too long: this job only
                out[i] = Generated("", error=str(exc), error_kind="adapter" if job.adapter else "input")

        def add_all() -> None:
            for _, req in reqs:
                self.engine.scheduler.add(req)

        self.engine.scheduler.control.put(add_all)
        deadline = time.monotonic() + timeout_s
        for i, req in reqs:
            out[i] = self._wait(req, deadline)
        return [g if g is not None else Generated("", error="not run", error_kind="engine") for g in out]

    def _request(self, job: ModelJob) -> Request:
        processor = None
        if job.schema is not None or job.json_mode:
            try:
                processor = self.engine.json_processor(job.schema)
            except Exception as exc:  # llguidance refuses some JSON-schema keywords (uniqueItems)
                raise LoomError(f"the output schema cannot be decoded under a grammar: {exc}") from None
        return self.engine.submit(
            job.prompt_ids, adapter=job.adapter, params=job.params, logits_processor=processor, enqueue=False
        )

    def _wait(self, req: Request, deadline: float) -> Generated:
        while True:
            try:
                chunk = req.sink.squeue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.engine.cancel(req.id)
                return Generated("", error="timed out", error_kind="timeout")
            if chunk.finished and chunk.completion is not None:
                c = chunk.completion
                kind = c.error_kind or ("engine" if c.finish_reason == "error" else None)
                return Generated(c.text, c.adapter, c.error, kind, c.prompt_tokens, len(c.token_ids))

    @property
    def base_ref(self) -> str | None:
        return self.engine.base_ref


def python_step(entry_point: str) -> Callable[[dict[str, Any], str], Generated]:
    """``module:function(payload, agent) -> str | dict`` as a step (the "live tool call")."""
    module, _, attr = entry_point.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise LoomError(
            f"fallback python {entry_point!r} cannot be imported ({exc}); check the module path"
        ) from None

    def run(payload: dict[str, Any], agent: str) -> Generated:
        answer = fn(payload, agent)
        return Generated(answer if isinstance(answer, str) else json.dumps(answer))

    return run


def endpoint_step(
    url: str, model: str, api_key_env: str | None, timeout_s: float
) -> Callable[[list[dict[str, str]], dict[str, Any] | None], Generated]:
    """An OpenAI-compatible chat endpoint (a remote Loom: ``model`` names the agent there, and
    that server adds the agent's own system prompt)."""
    key = os.environ.get(api_key_env) if api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def run(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> Generated:
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0}
        if schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        try:
            r = httpx.post(
                f"{url.rstrip('/')}/v1/chat/completions", json=body, headers=headers, timeout=timeout_s
            )
        except httpx.HTTPError as exc:
            return Generated("", error=f"endpoint {url} unreachable: {exc}", error_kind="endpoint")
        if r.status_code != 200:
            return Generated("", error=f"endpoint {url} answered {r.status_code}", error_kind="endpoint")
        data = r.json()
        usage = data.get("usage") or {}
        return Generated(
            data["choices"][0]["message"]["content"] or "",
            adapter=data.get("model"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    return run
