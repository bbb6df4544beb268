"""What every route shares: the engine once loaded, admission (bounded queue -> 429),
prompt checks, and running one generation with a timeout and cancel-on-disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from starlette.requests import Request

from loom.conversations import open_store
from loom.engine import SamplingParams
from loom.engine.engine import Prompt
from loom.engine.serving import ServingEngine
from loom.engine.types import Completion, LogitsProcessor, StreamChunk
from loom.serve.agents import ServedAgents
from loom.serve.config import ServeConfig
from loom.serve.errors import APIError, server_error
from loom.serve.leasing import ServingLeases
from loom.serve.lora_limits import check_served
from loom.serve.metrics import Metrics
from loom.serve.plan import ServePlan
from loom.serve.registry import ModelRegistry, Target

RETRY_AFTER_S = "1"


class Admission:
    """One admitted request's claim on the queue; released exactly once."""

    def __init__(self, service: Service, n: int) -> None:
        self.service, self.n, self.released = service, n, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.service.in_flight -= self.n
            self.service.metrics.in_flight.set(self.service.in_flight)


@dataclass
class Job:
    """A checked generation, ready to submit."""

    ids: list[int]
    target: Target
    params: SamplingParams
    processor: LogitsProcessor | None = None
    prompt_index: int = 0  # usage counts each prompt once, however many choices share it


class Service:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.engine: ServingEngine | None = None
        self.registry: ModelRegistry | None = None
        self.plan: ServePlan | None = None
        self.status = "loading"  # loading -> ok | failed; draining on shutdown
        self.error: str | None = None
        self.in_flight = 0
        self.leases: ServingLeases | None = None  # the store lease on what this server uses
        self.agents = ServedAgents(None)  # create_app sets the map's
        self.metrics = Metrics(self._engine_stats)
        self.conversations = open_store(
            cfg.conversations, max_sessions=cfg.max_sessions, max_messages=cfg.max_session_messages
        )

    def refuse_beyond_limits(self, engine: ServingEngine) -> None:
        """Every adapter version the engine resolves, by any route (requests, agents, pools,
        /v1/load_lora_adapter, hot-swaps), is checked against --max-lora-rank/--lora-targets from
        its manifest before its files are fetched: beyond them it is a 400 naming the flag."""
        cfg = engine.config

        def check(key: str) -> None:
            check_served(engine.store, key, cfg.max_rank, cfg.lora_targets)

        engine.version_listeners.insert(0, check)  # before the lease: a refused version is not held

    def _engine_stats(self) -> dict[str, Any] | None:
        return self.engine.stats() if self.engine is not None else None

    # -------------------------------------------------------------- gates
    def ready(self) -> tuple[ServingEngine, ModelRegistry]:
        if self.status != "ok" or self.engine is None or self.registry is None:
            detail = f": {self.error}" if self.error else "; retry when GET /health answers 200"
            raise APIError(
                503,
                f"the server is {self.status}{detail}",
                "service_unavailable",
                self.status,
                headers={"Retry-After": "5"},
            )
        return self.engine, self.registry

    @property
    def capacity(self) -> int:
        batch = self.engine.config.max_batch_size if self.engine else self.cfg.max_batch_size
        return batch + self.cfg.max_queue

    def admit(self, n: int = 1) -> Admission:
        """Claim room for ``n`` generations, or answer 429 rather than queue without end."""
        self.ready()
        if self.in_flight + n > self.capacity:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429,
                f"server busy: {self.in_flight} generations in flight and the limit is {self.capacity} "
                f"(running batch + --max-queue {self.cfg.max_queue}); retry after {RETRY_AFTER_S} s",
                "rate_limit_error",
                "queue_full",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)
        return Admission(self, n)

    # -------------------------------------------------------------- jobs
    def job(
        self,
        prompt: Prompt,
        target: Target,
        params: SamplingParams,
        max_tokens_given: bool,
        processor: LogitsProcessor | None = None,
    ) -> Job:
        """Tokenize and check lengths; an unset max_tokens shrinks to what the context leaves."""
        engine, _ = self.ready()
        ids = self.tokenize(prompt)
        max_len = engine.max_len
        limit = self.prompt_limit()
        if len(ids) > limit:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, more than this server's limit of {limit}; "
                "shorten it (or start the server with a larger --max-seq-len)",
                code="context_length_exceeded",
                param="messages",
            )
        room = max_len - len(ids)
        if params.max_new_tokens > room:
            if max_tokens_given:
                raise APIError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                    f"context of {max_len} tokens; lower max_tokens to at most {room}",
                    code="context_length_exceeded",
                    param="max_tokens",
                )
            params.max_new_tokens = room
        return Job(ids, target, params, processor)

    def tokenize(self, prompt: Prompt) -> list[int]:
        engine, _ = self.ready()
        try:
            return engine.tokenize(prompt)
        except TemplateError as exc:  # e.g. a chat template that insists on alternating roles
            raise APIError(
                400, f"the base's chat template refused these messages: {exc}", param="messages"
            ) from None

    def prompt_limit(self) -> int:
        """The most prompt tokens a request may have (--max-prompt-tokens, below the context)."""
        max_len = self.ready()[0].max_len
        return min(self.cfg.max_prompt_tokens or max_len - 1, max_len - 1)

    def _submit_stream(self, job: Job) -> AsyncIterator[StreamChunk]:
        engine, _ = self.ready()
        return engine.stream(
            job.ids,
            adapter=job.target.version or job.target.adapter,
            params=job.params,
            logits_processor=job.processor,
        )

    async def run(self, request: Request, jobs: list[Job]) -> list[Completion]:
        """Generations to completion; a timeout or a client that goes away cancels all of them."""
        gens = [asyncio.ensure_future(self._collect(job)) for job in jobs]
        together: asyncio.Future[list[Completion]] = asyncio.gather(*gens)
        gone: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {together, gone}, timeout=self.cfg.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if together in done:
                return [self.checked(c, job) for c, job in zip(together.result(), jobs, strict=True)]
            if gone in done:
                self.metrics.cancelled.inc()
                raise APIError(499, "client disconnected", code="client_closed_request")
            raise APIError(
                504,
                f"the generation did not finish within {self.cfg.request_timeout_s:.0f} s; lower "
                "max_tokens or raise --request-timeout",
                "timeout_error",
                "timeout",
            )
        finally:
            gone.cancel()
            for gen in gens:  # the engine stream's finally cancels its request in the engine
                gen.cancel()
            together.cancel()

    async def _collect(self, job: Job) -> Completion:
        async for chunk in self._submit_stream(job):
            if chunk.finished and chunk.completion is not None:
                return chunk.completion
        raise APIError(500, "the engine ended a stream without a completion", "server_error")

    async def stream(self, job: Job) -> AsyncGenerator[StreamChunk, None]:
        """Chunks of one generation; the last carries the checked completion. A timeout cancels it.
        A client disconnect closes this generator, whose ``finally`` cancels the engine request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.request_timeout_s
        chunks = self._submit_stream(job).__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise APIError(
                        504,
                        f"the generation did not finish within {self.cfg.request_timeout_s:.0f} s",
                        "timeout_error",
                        "timeout",
                    ) from None
                if chunk.finished and chunk.completion is not None:
                    self.checked(chunk.completion, job)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.cancelled.inc()
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    def checked(self, completion: Completion, job: Job) -> Completion:
        """Turn an engine-side failure into the right API error; record metrics of a success."""
        if completion.finish_reason == "error":
            detail = completion.error or "engine error"
            if completion.error_kind == "adapter":
                raise APIError(400, detail, code="adapter_load_failed", param="model")
            if completion.error_kind == "input":  # the backend refused the request itself (vLLM's 4xx)
                raise APIError(400, detail)
            if self.status == "draining":
                raise APIError(
                    503, "the server is shutting down; retry on another replica", "server_error", "draining"
                )
            if self.status == "restarting" or completion.error_kind == "backend_unavailable":
                # the vLLM backend died under this request (its supervisor restarts it)
                raise APIError(
                    503,
                    f"the serving backend is restarting ({self.error or detail}); retry shortly",
                    "server_error",
                    "restarting",
                    headers={"Retry-After": "5"},
                )
            # the server's fault: the client gets a request id, the log gets the engine's text
            if completion.error_kind == "adapter_store":
                raise server_error(
                    f"adapter {job.target.version or job.target.model} could not be read from the "
                    "server's store; an operator should run 'loom store verify'",
                    "adapter_unreadable",
                    RuntimeError(detail),
                )
            raise server_error("engine error while generating", "engine_error", RuntimeError(detail))
        self.metrics.observe_completion(job.target.model, len(job.ids), completion)
        return completion


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def resolve_target(request: Request, model: str | None) -> Target:
    """The request's ``model`` -> what the engine runs, down to the adapter version (unknown or
    incompatible: 404/400 before any output); also the request's metric label. Store reads
    (agent folders, alias refreshes, downloads) run on a worker thread, never on the loop."""
    engine, registry = service_of(request).ready()
    target = registry.resolve_cached(model)
    if target is None:
        target = await asyncio.to_thread(registry.resolve, model)
    if target.adapter is not None:  # beyond --max-lora-rank/--lora-targets: 400 (refuse_beyond_limits)
        target.version = (await engine.aresolve_adapter(target.adapter)).key
        agent = registry.agents.get(target.model)
        if agent is not None:  # the system prompt the answering version was trained with
            prompt = agent.cached_prompt(target.version)  # a store read only for a new version
            if prompt is None:
                prompt = await asyncio.to_thread(agent.prompt_for, target.version)
            target.system = prompt.system
    request.state.model = target.model
    return target


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
