"""``load_agents``: the agent map bound to a runtime (an in-process engine or a remote server)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, overload

from loom.agents.agent import Agent, BaseFacts, build_agent
from loom.agents.remote import RemoteAgents
from loom.agents.result import AgentResult
from loom.agents.runtime import AgentRuntime
from loom.agents.spec import (
    MAP_FILE,
    RECOMMENDED_FILE,
    AgentMapFile,
    FallbackStep,
    load_map_file,
    read_document,
)
from loom.engine import Engine
from loom.engine.serving import ServingEngine
from loom.errors import LoomError
from loom.store.store import Store


class BoundAgent:
    """An agent ready to run: ``agents["intent"].run({"text": "play jazz"})``."""

    def __init__(self, agent: Agent, runtime: AgentRuntime) -> None:
        self.agent, self.runtime = agent, runtime

    @property
    def name(self) -> str:
        return self.agent.name

    def run(self, payload: dict[str, Any]) -> AgentResult:
        return self.runtime.run(self.agent, payload)

    def run_many(self, payloads: list[dict[str, Any]]) -> list[AgentResult]:
        return self.runtime.run_many(self.agent, payloads)

    def info(self) -> dict[str, Any]:
        return self.agent.info()


class Agents(Mapping[str, BoundAgent]):
    """The map's agents; one that failed its checks raises its error when asked for (the
    others still run), and ``errors`` lists them."""

    def __init__(
        self,
        agents: dict[str, Agent],
        runtime: AgentRuntime,
        source: str,
        engine: Engine | None = None,
        errors: dict[str, str] | None = None,
    ):
        self.agents, self.runtime, self.source, self.engine = agents, runtime, source, engine
        self.errors = errors or {}
        self._bound = {name: BoundAgent(a, runtime) for name, a in agents.items()}

    def __getitem__(self, name: str) -> BoundAgent:
        bound = self._bound.get(name)
        if bound is None:
            if name in self.errors:
                raise LoomError(self.errors[name])
            raise LoomError(f"no agent {name!r} in {self.source}; agents: {sorted(self._bound) or 'none'}")
        return bound

    def __iter__(self) -> Iterator[str]:
        return iter(self._bound)

    def __len__(self) -> int:
        return len(self._bound)


def find_map(path: Path | str | None) -> Path:
    """``path``, else $LOOM_AGENT_MAP, else ./AGENT_MODEL_MAP.json."""
    chosen = path or os.environ.get("LOOM_AGENT_MAP") or MAP_FILE
    found = Path(chosen)
    if not found.is_file():
        raise LoomError(
            f"agent map {found} does not exist; pass a file (AGENT_MODEL_MAP.json or YAML) "
            "or set LOOM_AGENT_MAP"
        )
    return found


def base_facts(engine: ServingEngine | None, store: Store | None) -> BaseFacts:
    if engine is None:
        return BaseFacts(None, None)
    info = None
    if store is not None and engine.base_ref and "@" in engine.base_ref:
        info = store.resolve(engine.base_ref).manifest.base
    stats = engine.stats()
    dtype = str(stats.get("dtype", "float32"))
    variant = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    return BaseFacts(engine.base_ref, info, variant, str(stats.get("device", "cpu")))


def build_agents(
    doc: AgentMapFile, engine: ServingEngine | None, store: Store | None, base: BaseFacts | None = None
) -> tuple[dict[str, Agent], dict[str, str]]:
    """Each agent checked against the store and the served base (``engine``'s, or ``base``
    when checking without weights); failures by name."""
    base = base or base_facts(engine, store)
    agents, errors = {}, {}
    for name, entry in doc.agents.items():
        try:
            agents[name] = build_agent(name, entry, store, base)
        except LoomError as exc:
            errors[name] = str(exc)
    return agents, errors


def load_recommended(doc: AgentMapFile, where: Path) -> dict[str, FallbackStep]:
    """AGENT_MODEL_RECOMMENDED.json: legacy model name -> a step (python, endpoint, stub, adapter)."""
    path = Path(doc.recommended) if doc.recommended else where.parent / RECOMMENDED_FILE
    if not path.is_absolute():
        path = where.parent / path
    if not path.is_file():
        if doc.recommended:
            raise LoomError(f"agent map {where}: recommended file {path} does not exist")
        return {}
    raw = read_document(path, "recommended models file")
    table = raw.get("models", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise LoomError(
            f'{path}: expected a JSON object of legacy name -> step (e.g. {{"python": "mod:fn"}})'
        )
    out = {}
    for name, spec in table.items():
        try:
            out[name] = FallbackStep.model_validate(spec)
        except ValueError as exc:
            raise LoomError(f"{path}: legacy {name!r}: {exc}") from None
        if out[name].legacy is not None:  # one level only: a chain of names could loop
            raise LoomError(
                f"{path}: legacy {name!r} names another legacy step; give the step itself "
                "(python, endpoint, adapter, base or stub)"
            )
    return out


@overload
def load_agents(
    path: Path | str | None = None, *, engine: Engine | None = None, store: Store | None = None
) -> Agents: ...


@overload
def load_agents(path: None = None, *, url: str, api_key: str | None = None) -> RemoteAgents: ...


def load_agents(
    path: Path | str | None = None,
    *,
    engine: Engine | None = None,
    store: Store | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> Agents | RemoteAgents:
    """The agents of a map, checked and ready to run on ``engine`` (default: an engine on the
    store's default base, started here); or, with ``url``, those a Loom server runs."""
    if url is not None:
        return RemoteAgents(url, api_key)
    where = find_map(path)
    doc = load_map_file(where)
    if engine is None:
        store = store or Store()
        engine = Engine.from_store(store=store)
    store = store or engine.store
    agents, errors = build_agents(doc, engine, store)
    return Agents(agents, runtime_for(doc, where, engine), str(where), engine, errors)


def runtime_for(doc: AgentMapFile, where: Path, engine: Engine | None) -> AgentRuntime:
    from loom.agents.backends import EngineBackend
    from loom.agents.cite import citation_hook

    backend = EngineBackend(engine) if engine is not None else None
    return AgentRuntime(backend, load_recommended(doc, where), citation_hook(doc, where))
