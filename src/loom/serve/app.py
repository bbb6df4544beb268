"""``create_app``: the FastAPI application, its start-up (plan, engine, warm-up, preload, pools)
and the ASGI guards (body size, request metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from loom import __version__
from loom.engine import Engine, SamplingParams
from loom.engine.serving import ServingEngine
from loom.serve.agents import ServedAgents
from loom.serve.auth import exposure_warnings
from loom.serve.config import ServeConfig
from loom.serve.errors import install_handlers
from loom.serve.leasing import ServingLeases
from loom.serve.plan import QUANTIZED_ORDER, ServePlan, make_plan, plan_from_store
from loom.serve.pools import PoolManager
from loom.serve.registry import ModelRegistry
from loom.serve.requestlog import open_log
from loom.serve.service import Service
from loom.store.manifest import ArchitectureFacts
from loom.store.store import Store
from loom.store.variants import CPU_VARIANTS

log = logging.getLogger("loom.serve")


def create_app(cfg: ServeConfig, store: Store | None = None, engine: ServingEngine | None = None) -> FastAPI:
    """The server. With ``engine`` given it serves that engine; otherwise it loads one in the
    background at start-up (``/health`` answers 503 until the base is loaded and warm).
    Raises LoomError when ``cfg.require_keys`` is set and no key is."""
    for warning in exposure_warnings(cfg):
        log.warning("\n%s\n!!! SECURITY: %s\n%s", "!" * 78, warning, "!" * 78)
    service = Service(cfg)
    service.agents = ServedAgents(cfg.agents_file)  # a bad map stops here, before any loading
    if not cfg.variant_preference:
        cfg.variant_preference = service.agents.variant_preference()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(
            target=_start,
            args=(service, app.state.pools, store, engine),
            name="loom-serve-start",
            daemon=True,
        )
        thread.start()
        yield
        # uvicorn has stopped accepting and waited for running requests: now stop the engine.
        service.status = "draining"
        if service.engine is not None and engine is None:  # off the loop: vLLM takes seconds to stop
            await asyncio.to_thread(service.engine.shutdown)
        if service.leases is not None:
            service.leases.close()
        if app.state.request_log is not None:  # writes what is still queued
            await asyncio.to_thread(app.state.request_log.close)
        await asyncio.to_thread(conversation_routes.flush_cut_offs)  # turns cut by the shutdown
        await asyncio.to_thread(service.conversations.close)

    app = FastAPI(title="Loom", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.pools = PoolManager(service)
    app.state.request_log = open_log(cfg.request_log, cfg.request_log_retention, cfg.log_prompts)
    install_handlers(app)
    from loom.serve import conversations as conversation_routes
    from loom.serve import routes_admin, routes_agents, routes_feedback, routes_native, routes_openai

    app.include_router(routes_openai.router)
    app.include_router(routes_native.router)
    app.include_router(conversation_routes.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_agents.router)
    app.include_router(routes_feedback.router)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(RequestMetrics, service=service)  # outermost: it also counts the 413s
    return app


def _start(
    service: Service,
    pools: PoolManager,
    store: Store | None,
    engine: ServingEngine | None,
) -> None:
    cfg = service.cfg
    try:
        preload = [*cfg.preload, *service.agents.adapters()]
        if engine is None:
            engine, service.plan = build_engine(cfg, store, preload)
        service.engine = engine
        watch_backend(service, engine)
        service.refuse_beyond_limits(engine)
        if engine.store is not None and not cfg.stub:
            service.leases = ServingLeases(engine)
            service.leases.start()
        service.agents.build(engine, service.metrics)
        agents = service.agents.agents
        service.registry = ModelRegistry(
            engine.store, engine.base_ref or "base", engine.base_fingerprint, agents
        )
        engine.generate("Hello", params=SamplingParams(max_new_tokens=2))  # warm: first-step allocations
        for ref in preload:
            try:
                engine.load_adapter(ref, pin=True)
            except Exception as exc:  # serve the rest; the metric and the log say what failed
                service.metrics.preload_failures.inc()
                log.error("preloading adapter %s failed: %s", ref, exc)
        service.status = "ok"
        for agent in agents.values():
            if agent.warm and agent.adapter:
                try:
                    pools.create(agent.name, agent.warm)
                except Exception as exc:
                    log.error("the warm pool for agent %s failed: %s", agent.name, exc)
    except Exception as exc:
        service.metrics.preload_failures.inc()
        service.status, service.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("start-up failed: %s", service.error)


def build_engine(
    cfg: ServeConfig, store: Store | None, preload: list[str]
) -> tuple[ServingEngine, ServePlan]:
    if cfg.stub:
        return stub_engine(cfg)
    store = store or Store()
    plan = plan_from_store(cfg, store, preload)
    if cfg.backend == "vllm":
        from loom.vllm.start import start_engine

        return start_engine(plan, store, cfg.vllm, preload, cfg.alias_refresh_s), plan
    if plan.variant in QUANTIZED_ORDER:
        from loom.errors import LoomError

        raise LoomError(
            f"the plan chose {plan.variant}, a bitsandbytes variant the Loom engine does not serve; "
            "drop --quantize (the plan then picks bf16/fp16 on CUDA), or serve int8/int4 on a CPU "
            "(--device cpu --dtype int8)"
        )
    engine_cfg = {**vars(plan.engine_config()), "alias_refresh_s": cfg.alias_refresh_s}
    if plan.variant in CPU_VARIANTS:
        return quantized_engine(cfg, store, plan, engine_cfg), plan
    engine = Engine.from_store(plan.base_ref, device=cfg.device, dtype=plan.dtype, store=store, **engine_cfg)
    return engine, plan


def quantized_engine(cfg: ServeConfig, store: Store, plan: ServePlan, engine_cfg: dict[str, Any]) -> Engine:
    """The engine on ``plan.variant`` (int8/int4) of the base: made and cached on first load,
    its checksums verified, refused over the quality bounds unless ``--allow-lossy``."""
    from loom.engine.engine import EngineConfig
    from loom.errors import LoomError
    from loom.models.quantize import load_variant
    from loom.serve.plan import making_problem
    from loom.store.variants import read_variant

    base = store.resolve(plan.base_ref)
    problem = (
        None
        if read_variant(store, base, plan.variant)
        else making_problem(base, plan.variant, plan.budget_mb)
    )
    if problem is not None:
        raise LoomError(problem)

    def load() -> tuple[Any, Any, str | None, str | None]:
        model, tokenizer, ref, fingerprint, notes = load_variant(
            store, plan.base_ref, plan.variant, cfg.allow_lossy
        )
        for note in notes:
            log.warning("%s", note)
        plan.notes.extend(notes)
        return model, tokenizer, ref, fingerprint

    return Engine(config=EngineConfig(**engine_cfg), store=store, loader=load)


def watch_backend(service: Service, engine: ServingEngine) -> None:
    """A vLLM backend that dies makes /health answer 503 ("restarting", with the reason) until
    its supervisor has it back; vLLM's own metrics join Loom's /metrics, relabelled."""
    from loom.vllm.engine import VLLMEngine
    from loom.vllm.metrics import VLLMCollector

    if not isinstance(engine, VLLMEngine):
        return

    def on_state(state: str, detail: str | None) -> None:
        if service.status in ("ok", "restarting"):  # never over "draining" or "failed"
            service.status, service.error = state, detail

    engine.supervisor.on_state = on_state
    service.metrics.registry.register(VLLMCollector(engine.scraper))


def stub_engine(cfg: ServeConfig) -> tuple[Engine, ServePlan]:
    """Documented test mode: the tiny random Mistral from ``loom.testing`` (deterministic, no weights)."""
    from loom.testing import make_tiny_model, make_tokenizer

    model, tokenizer = make_tiny_model(), make_tokenizer()
    c = model.config
    arch = ArchitectureFacts(
        architecture="MistralForCausalLM",
        model_type=c.model_type,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
    )
    plan = make_plan(cfg, arch, None, "stub@tiny-random", [])
    engine = Engine(model, tokenizer, config=plan.engine_config(), base_ref="stub@tiny-random")
    return engine, plan


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length or while reading a chunked body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"body over {self.max_bytes} bytes; send less or raise --max-body-bytes",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen, over = 0, False

        async def limited() -> Any:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise ValueError("request body too large")
            return message

        async def guarded_send(message: Any) -> None:
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(send)  # whatever the app made of the broken body, it is a 413

        await self.app(scope, limited, guarded_send)


class RequestMetrics:
    """Counts every request by route template, model and status; times it end to end."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), 500

        async def recording_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            # Only resolved models become label values: unknown names (404) must not grow the series.
            model = scope.get("state", {}).get("model", "") if status != 404 else ""
            m = self.service.metrics
            m.requests.labels(route, model, str(status)).inc()
            if route not in ("/metrics", "/health"):
                m.latency.labels(route).observe(time.monotonic() - started)
