"""Worker pools over the one resident base: a pool pins an agent's (or an adapter's) weights
in an engine slot and reserves ``warm_size`` rows of the running batch for it. Hot-swapping a
pool moves its adapter name to another version while requests keep flowing: running requests
finish on the old version (their slot stays referenced), new ones start on the new one.

The methods block on adapter reads: routes run them in a worker thread."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loom.errors import LoomError
from loom.refs import parse_ref
from loom.serve.errors import APIError
from loom.serve.service import Service


@dataclass
class Pool:
    id: str
    model: str  # the agent or adapter it was created for
    adapter: str  # concrete name@version now serving
    warm_size: int
    created_at: float = field(default_factory=time.time)
    swaps: list[dict[str, Any]] = field(default_factory=list)


class PoolManager:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.pools: dict[str, Pool] = {}
        self._ids = itertools.count(1)
        self.lock = threading.Lock()  # called from worker threads: routes use asyncio.to_thread

    def describe(self) -> list[dict[str, Any]]:
        engine = self.service.engine
        resident = set(engine.stats()["resident_adapters"]) if engine else set()
        return [{**asdict(p), "resident": p.adapter in resident} for p in self.pools.values()]

    def create(self, model: str, warm_size: int) -> Pool:
        engine, registry = self.service.ready()
        target = registry.resolve(model)
        if target.adapter is None:
            raise APIError(
                400, f"{model!r} is the base alone; a pool serves an agent or an adapter", param="agent"
            )
        batch = engine.config.max_batch_size
        with self.lock:
            reserved = sum(p.warm_size for p in self.pools.values())
            if reserved + warm_size > batch:
                raise APIError(
                    409,
                    f"warm_size {warm_size} over-commits the batch: pools already reserve {reserved} of "
                    f"{batch} rows (over by {reserved + warm_size - batch}); lower warm_size or delete one",
                    code="pool_overcommit",
                    param="warm_size",
                )
            try:
                key = engine.load_adapter(target.adapter, pin=True)
            except LoomError:
                self.service.metrics.preload_failures.inc()
                raise
            pool = Pool(f"pool-{next(self._ids)}", model, key, warm_size)
            self.pools[pool.id] = pool
            return pool

    def get(self, pool_id: str) -> Pool:
        pool = self.pools.get(pool_id)
        if pool is None:
            raise APIError(
                404,
                f"no pool {pool_id!r}; see GET /workers/pools",
                "not_found_error",
                "pool_not_found",
                "pool_id",
            )
        return pool

    def swap(self, pool_id: str, version: str) -> Pool:
        engine, _ = self.service.ready()
        pool = self.get(pool_id)
        name = pool.adapter.split("@", 1)[0]
        ref = version if "@" in version else f"{name}@{version}"
        parsed = parse_ref(ref)
        if parsed.kind != "store" or parsed.name != name:
            raise APIError(
                400,
                f"version {version!r}: give a version or alias of {name} (e.g. v2, champion)",
                param="version",
            )
        with self.lock:
            old = pool.adapter
            try:
                key = engine.swap_adapter(name, parsed.tag)
            except LoomError:
                self.service.metrics.swap_failures.inc()
                raise
            engine.pin_adapter(key, True)
            if key != old and not any(p.adapter == old for p in self.pools.values() if p is not pool):
                engine.pin_adapter(old, False)  # evictable once idle
            pool.adapter = key
            registry = self.service.registry
            agent = registry.agents.get(pool.model) if registry else None
            if agent is not None and agent.adapter and parse_ref(agent.adapter).name == name:
                agent.adapter = key  # an agent pinned to name@version follows its pool's swap too
            pool.swaps.append({"from": old, "to": key, "at": time.time()})
            return pool

    def delete(self, pool_id: str) -> Pool:
        engine, _ = self.service.ready()
        with self.lock:
            pool = self.get(pool_id)
            del self.pools[pool_id]
            if not any(p.adapter == pool.adapter for p in self.pools.values()):
                engine.pin_adapter(pool.adapter, False)
            return pool
