"""Where agent answers come from: Loom's engine (batched), Python entry points, and other
OpenAI-compatible endpoints (a remote Loom)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any, Protocol

from loom.agents.result import Generated
from loom.engine import Engine, SamplingParams
from loom.engine.request import Request
from loom.engine.serving import ServingEngine
from loom.errors import LoomError


@dataclass
class ModelJob:
    prompt_ids: list[int]
    adapter: str | None  # None: the base alone
    params: SamplingParams
    schema: dict[str, Any] | None = None  # decode under this JSON schema's grammar
    json_mode: bool = False  # JSON without a schema
    regex: str | None = None  # decode under this regex (a text answer's template)


class ModelBackend(Protocol):
    """Runs a batch of model jobs: Loom's engine in-process, or vLLM (``loom.vllm.agents``)."""

    @property
    def engine(self) -> ServingEngine: ...

    @property
    def base_ref(self) -> str | None: ...

    def generate(self, jobs: list[ModelJob], timeout_s: float) -> list[Generated]: ...


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
        try:
            if job.schema is not None or job.json_mode:
                processor = self.engine.json_processor(job.schema)
            elif job.regex is not None:
                processor = self.engine.regex_processor(job.regex)
        except Exception as exc:  # llguidance refuses some JSON-schema keywords (uniqueItems)
            raise LoomError(f"the output cannot be decoded under a grammar: {exc}") from None
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
