"""The ``model`` field: an agent, an adapter ref, a pool, or the base -> what the engine runs.

Only store refs are accepted from HTTP: paths and hub ids are refused, and
names are validated by ``loom.refs``, so a request can never reach outside the store.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from loom.agents.agent import Agent
from loom.errors import LoomError, NotFoundError, RefError
from loom.refs import parse_ref
from loom.serve.errors import APIError
from loom.store.store import Store

AGENT_REFRESH_S = 1.0  # a new agent folder in the store is served within this


class _NeedsRead(Exception):
    """resolve(may_read=False) got to a point where it would have to read the store."""


@dataclass
class Target:
    model: str  # as asked, echoed back in responses
    adapter: str | None  # ref handed to the engine; None: the base
    system: str | None = None
    version: str | None = None  # the concrete name@version the adapter ref resolved to


class ModelRegistry:
    def __init__(
        self,
        store: Store | None,
        base_ref: str,
        base_fingerprint: str | None,
        agents: dict[str, Agent],
    ) -> None:
        self.store, self.base_ref, self.fingerprint = store, base_ref, base_fingerprint
        self.base_name = base_ref.split("@", 1)[0]
        self.agents = agents
        self.dynamic: dict[str, str] = {}  # vLLM-style lora_name -> adapter ref
        self.lock = threading.Lock()
        self.created = int(time.time())
        # agent folder -> adapter names, read from the store at most every AGENT_REFRESH_S
        self._agent_names: tuple[float, dict[str, list[str]]] = (float("-inf"), {})

    def resolve_cached(self, model: str | None) -> Target | None:
        """:meth:`resolve` when it needs no store read (the base, an agent, a loaded LoRA name,
        a concrete version, a bare name while the agent folders' listing is fresh), else None:
        call :meth:`resolve` on a worker thread."""
        try:
            return self.resolve(model, may_read=False)
        except _NeedsRead:
            return None

    def resolve(self, model: str | None, may_read: bool = True) -> Target:
        if model is not None and (model != model.strip() or len(model) > 128):
            # the name becomes a metric label and is echoed back: one spelling per model
            raise APIError(
                400,
                "model: give a name without surrounding whitespace, at most 128 characters",
                param="model",
            )
        if not model or model in (self.base_name, self.base_ref, "base"):
            return Target(model or self.base_name, None)
        agent = self.agents.get(model)
        if agent is not None:
            return Target(model, agent.adapter, agent.system)
        with self.lock:
            dynamic = self.dynamic.get(model)
        if dynamic is not None:
            return Target(model, dynamic)
        try:
            ref = parse_ref(model)
        except RefError as exc:
            raise NotFoundError(f"model {model!r}: {exc}") from None
        if ref.kind != "store":
            raise APIError(
                400,
                f"model {model!r}: HTTP requests may name only the base, an agent or a store adapter "
                f"(name or name@version), never a path or hub id; see GET /v1/models",
                param="model",
            )
        if ref.selector is None and self.store is not None:
            group = self._agent_group(ref.name, may_read)
            if group is not None:
                return Target(model, group)
        return Target(model, model)

    def _agent_group(self, agent: str, may_read: bool = True) -> str | None:
        """A store agent folder (adapters/<agent>/...) holding exactly one adapter serves as that agent."""
        names = self._agent_adapters(may_read).get(agent, [])
        if agent in names or not names:
            return None
        if len(names) > 1:
            raise APIError(
                400,
                f"model {agent!r} is an agent with several adapters {sorted(names)}; name one",
                param="model",
            )
        return names[0]

    def _agent_adapters(self, may_read: bool = True) -> dict[str, list[str]]:
        """Agent folder -> its adapters' names, re-listed at most every AGENT_REFRESH_S
        (``may_read=False``: raise _NeedsRead rather than list the store)."""
        assert self.store is not None
        with self.lock:
            read_at, names = self._agent_names
        if time.monotonic() - read_at < AGENT_REFRESH_S:
            return names
        if not may_read:
            raise _NeedsRead
        fresh: dict[str, list[str]] = {}
        for a in self.store.artifacts():
            if a.kind == "adapter" and a.agent:
                fresh.setdefault(a.agent, []).append(a.name)
        with self.lock:
            self._agent_names = (time.monotonic(), fresh)
        return fresh

    def models(self) -> list[dict[str, Any]]:
        """The base, every adapter in the store built for it, the agents and loaded LoRA names."""

        def entry(id_: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": id_,
                "object": "model",
                "created": self.created,
                "owned_by": "loom",
                "root": root,
                "parent": parent,
            }

        out = [entry(self.base_name, self.base_ref, None)]
        seen = {self.base_name}
        for name, spec in self.agents.items():
            out.append(entry(name, spec.adapter or self.base_ref, self.base_name))
            seen.add(name)
        with self.lock:
            dynamic = dict(self.dynamic)
        for name, ref in dynamic.items():
            out.append(entry(name, ref, self.base_name))
            seen.add(name)
        if self.store is not None:
            for summary in self.store.summaries("adapter"):
                name = summary.artifact.name
                version = summary.aliases.get("current") or (
                    summary.versions[-1] if summary.versions else None
                )
                if name in seen or version is None:
                    continue
                try:
                    info = self.store.manifest(summary.artifact, version).adapter
                except LoomError:
                    continue  # an unreadable manifest is for `loom store verify`, not the model list
                if info is not None and info.base_fingerprint == self.fingerprint:
                    out.append(entry(name, f"{name}@{version}", self.base_name))
        return out
