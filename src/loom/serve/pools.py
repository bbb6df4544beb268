"""Worker pools over the one resident base: a pool pins an agent's (or an adapter's) weights
in an engine slot and reserves ``warm_size`` rows of the running batch for its requests
(``BatchRows``, at admission: other requests wait rather than take them). Hot-swapping a
pool moves its adapter name to another version while requests keep flowing: running requests
finish on the old version (their slot stays referenced), new ones start on the new one.

The methods block on adapter reads: routes run them in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.requests import Request

from loom.errors import LoomError
from loom.refs import parse_ref
from loom.serve.errors import APIError
from loom.serve.registry import Target
from loom.serve.service import Admission, Service


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
        self.rows = BatchRows(self)

    def batch_size(self) -> int:
        engine = self.service.engine
        return engine.config.max_batch_size if engine else self.service.cfg.max_batch_size

    def pool_for(self, adapter: str | None) -> str | None:
        """The pool serving requests for ``adapter`` (any version of its name), if any."""
        if adapter is None:
            return None
        name = adapter.split("@", 1)[0]
        return next((p.id for p in self.pools.values() if p.adapter.split("@", 1)[0] == name), None)

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


class Grant:
    """A request's rows of the running batch (and its queue admission): released exactly once."""

    def __init__(self, rows: BatchRows, pool_id: str | None, n: int, admission: Admission) -> None:
        self.rows, self.pool_id, self.n, self.admission = rows, pool_id, n, admission
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.rows.give_back(self.pool_id, self.n)
            self.admission.release()


class BatchRows:
    """Reserves ``warm_size`` rows of the engine's running batch for each pool, at admission:
    a request for a pool's adapter may use the pool's rows and any unreserved one; any other
    request only unreserved rows, and waits here (up to the request timeout) while none is
    free, so the engine never holds more of them than the pools leave. With no rows reserved
    nothing waits: requests go to the engine's own queue as before. Runs on the event loop."""

    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager
        self.used: dict[str | None, int] = {}  # rows held, by pool id (None: no pool)
        self.changed = asyncio.Event()

    def _owed(self, mine: str | None) -> int:
        """Rows other pools are owed: reserved and not in use by their own requests."""
        pools = list(self.manager.pools.values())
        return sum(max(0, p.warm_size - self.used.get(p.id, 0)) for p in pools if p.id != mine)

    def _open(self, pool_id: str | None) -> tuple[int, int]:
        """(rows free to this class now, the most it could ever hold)."""
        batch = self.manager.batch_size()
        others = sum(p.warm_size for p in self.manager.pools.values() if p.id != pool_id)
        return batch - sum(self.used.values()) - self._owed(pool_id), batch - others

    async def take(self, adapter: str | None, n: int, admission: Admission, timeout_s: float) -> Grant:
        """Rows for ``n`` generations of ``adapter``; on any failure the admission is released."""
        try:
            pool_id = self.manager.pool_for(adapter)
            await self._wait_for_rows(pool_id, n, timeout_s)
        except BaseException:
            admission.release()
            raise
        self.used[pool_id] = self.used.get(pool_id, 0) + n
        return Grant(self, pool_id, n, admission)

    async def _wait_for_rows(self, pool_id: str | None, n: int, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(p.warm_size for p in self.manager.pools.values()):
            free, most = self._open(pool_id)
            if n <= free:
                return
            if n > most:
                raise APIError(
                    400,
                    f"this request needs {n} batch rows but pools reserve all but {most} of "
                    f"{self.manager.batch_size()} for their adapters; send fewer prompts or a lower n "
                    "(or delete a pool, or lower its warm_size)",
                    param="n",
                )
            if loop.time() >= deadline:
                raise APIError(
                    504,
                    f"no batch row was free within {timeout_s:.0f} s (pools reserve rows for their "
                    "adapters); retry later",
                    "timeout_error",
                    "timeout",
                )
            self.changed.clear()
            # woken by a release; pools made or deleted on worker threads are seen within 0.1 s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(0.1, deadline - loop.time()))

    def give_back(self, pool_id: str | None, n: int) -> None:
        self.used[pool_id] = self.used.get(pool_id, 0) - n
        self.changed.set()


async def take_rows(request: Request, target: Target, n: int, admission: Admission) -> Grant:
    """Batch rows for a request's ``n`` generations of ``target``, holding its ``admission``."""
    manager: PoolManager = request.app.state.pools
    timeout = manager.service.cfg.request_timeout_s
    return await manager.rows.take(target.adapter, n, admission, timeout)
