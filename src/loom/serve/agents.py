"""The agents a server runs: the map parsed at start-up (a bad file stops the start with the
error), each agent checked once the base is loaded (one that fails its checks is listed as
unavailable with the reason; the others serve)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loom.agents.agent import Agent
from loom.agents.backends import EngineBackend, ModelBackend
from loom.agents.cite import Cited, citation_hook, open_registry
from loom.agents.loader import build_agents, load_recommended
from loom.agents.runtime import AgentRuntime
from loom.agents.spec import AgentMapFile, load_map_file
from loom.engine.serving import ServingEngine
from loom.serve.metrics import Metrics

log = logging.getLogger("loom.serve")


class ServedAgents:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.doc: AgentMapFile | None = load_map_file(path) if path else None
        # checked with the map, before any weights load
        self.recommended = load_recommended(self.doc, path) if self.doc and path else {}
        self.agents: dict[str, Agent] = {}
        self.errors: dict[str, str] = {}  # agent -> why it is not served
        self.runtime: AgentRuntime | None = None
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="loom-agents")

    def variant_preference(self) -> list[str]:
        """The first agent's that states one (one base is served in one variant for all)."""
        if self.doc is None:
            return []
        return next((e.variant_preference for e in self.doc.agents.values() if e.variant_preference), [])

    def adapters(self) -> list[str]:
        """The adapters the map names (preloaded and pinned at start-up)."""
        if self.doc is None:
            return []
        return [e.adapter for e in self.doc.agents.values() if e.adapter]

    def build(self, engine: ServingEngine, metrics: Metrics) -> None:
        if self.doc is None or self.path is None:
            return
        self.agents, self.errors = build_agents(self.doc, engine, engine.store)
        for name, error in self.errors.items():  # one bad agent does not stop the others
            log.error("agent %s is not served: %s", name, error)
        registry = open_registry(self.doc, self.path)
        hook = citation_hook(self.doc, self.path, registry)

        def cite(agent: Any, raw: str) -> Cited:
            cited = hook(agent, raw)
            unknown = sum(1 for c in cited.sources if not c["known"])
            if unknown:
                metrics.unknown_citations.labels(agent.name).inc(unknown)
            return cited

        self.runtime = AgentRuntime(backend_for(engine), self.recommended, cite)

    def describe(self, engine: ServingEngine | None = None) -> list[dict[str, Any]]:
        """Each agent's info, with the adapter version it answers with now (from the engine's
        routes: no store read; None before its first request)."""
        out = []
        for agent in self.agents.values():
            version = None
            if engine is not None and agent.adapter:
                hit = engine.resolver.cached(agent.adapter)
                version = hit.key if hit is not None else engine.resolver.routed(agent.adapter)
            out.append({**agent.info(), "adapter_version": version, "status": "ok"})
        out += [{"name": n, "status": "unavailable", "error": e} for n, e in self.errors.items()]
        return out


def backend_for(engine: ServingEngine) -> ModelBackend:
    """Agents batch through the engine that serves: Loom's scheduler, or concurrent vLLM requests."""
    from loom.engine import Engine

    if isinstance(engine, Engine):
        return EngineBackend(engine)
    from loom.vllm.agents import VLLMBackend
    from loom.vllm.engine import VLLMEngine

    if isinstance(engine, VLLMEngine):
        return VLLMBackend(engine)
    raise TypeError(f"no agents backend for {type(engine).__name__}")
