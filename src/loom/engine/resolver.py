"""Adapter refs -> the concrete, checked version the engine loads, following the store.

The store is the source of truth at runtime: a bare name (``intent``) or an alias
(``intent@champion``) is re-read from the store when its route is older than
``refresh_s``, so ``loom store alias set``, ``rollback`` and promotions reach live traffic
within ``refresh_s`` (plus the request that notices it). Requests already running keep
the concrete version they started with. A concrete version is immutable, so what is known
about it (its folder and checksums) is never re-read.

All store I/O (alias and manifest reads, object-store downloads) happens in :meth:`resolve`,
which callers run on a worker thread, never on the event loop or the engine thread;
:meth:`cached` answers without I/O when it can (the hot path).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loom.errors import LoomError
from loom.models.loading import materialize, resolve_adapter
from loom.refs import parse_ref
from loom.store.store import Store

DEFAULT_REFRESH_S = 1.0
RECENT_S = 60.0  # a version resolved this recently counts as in use (its request may be loading it)
log = logging.getLogger("loom.engine")


@dataclass(frozen=True)
class ResolvedAdapter:
    key: str  # name@version, or path:/abs/folder for a local folder
    folder: Path
    checksums: dict[str, str] | None  # file -> sha256 from the manifest (None: local folder)


@dataclass
class Route:
    """Where a bare name or alias sends new requests."""

    key: str
    alias_version: str | None  # what the store's alias said when last read
    checked_at: float
    explicit: bool = False  # set by a hot-swap; holds until the store's alias moves


class AdapterResolver:
    def __init__(
        self,
        store: Store | None,
        base_fingerprint: str | None,
        refresh_s: float = DEFAULT_REFRESH_S,
        on_resolved: Callable[[str], None] | None = None,
    ) -> None:
        """``on_resolved(key)``: called with every concrete version before its files are
        fetched (the server leases it, so gc never retires a version being loaded)."""
        self.store, self.fingerprint, self.refresh_s = store, base_fingerprint, refresh_s
        self.on_resolved = on_resolved
        self.routes: dict[str, Route] = {}  # "name" or "name@alias" -> route
        self.versions: dict[str, ResolvedAdapter] = {}  # name@version -> checked, local
        self.resolved_at: dict[str, float] = {}  # name@version -> last resolution
        self.lock = threading.Lock()
        self.counters = {"alias_refreshes": 0, "alias_moves": 0, "alias_refresh_failures": 0}

    def cached(self, ref: str) -> ResolvedAdapter | None:
        """The answer without store I/O, or None when :meth:`resolve` must read the store."""
        if ref.startswith("path:"):  # a local folder's key, as resolve() made it
            return ResolvedAdapter(ref, Path(ref.removeprefix("path:")), None)
        now = time.monotonic()
        with self.lock:
            known = self.versions.get(ref)
            route = self.routes.get(ref) if known is None else None
            if route is not None and now - route.checked_at < self.refresh_s:
                known = self.versions.get(route.key)
            if known is not None:  # still in use: its lease (in_use) must not lapse while requested
                self.resolved_at[known.key] = now
            return known

    def resolve(self, ref: str) -> ResolvedAdapter:
        """``ref`` -> its concrete version, checked (kind, base fingerprint) and local.
        Blocking: call it from a worker thread."""
        hit = self.cached(ref)
        if hit is not None:
            return hit
        parsed = parse_ref(ref)
        if parsed.kind == "path":
            folder = Path(parsed.name)
            if not (folder / "adapter_config.json").is_file():
                raise LoomError(f"adapter {ref}: no adapter_config.json in that folder")
            return ResolvedAdapter(f"path:{folder.resolve()}", folder, None)
        if parsed.kind != "store":
            raise LoomError(f"adapter {ref}: give a store ref (name or name@version) or a local folder")
        if self.store is None:
            raise LoomError(f"adapter {ref}: this engine has no store; pass a local adapter folder")
        read_at = time.monotonic()  # a route is as new as the read that made it, not its return
        try:
            resolved = resolve_adapter(self.store, ref, self.fingerprint, "the base this engine serves")
        except LoomError:
            raise  # the store answered (no such adapter, wrong base): the request fails
        except Exception as exc:  # the store did not answer: keep serving the last route
            kept = self._keep_route(ref, exc)
            if kept is None:
                raise
            return kept
        key = resolved.ref
        with self.lock:  # in use from now: a lease sync during the download keeps it
            self.resolved_at[key] = time.monotonic()
        if key not in self.versions:
            if self.on_resolved is not None:
                self.on_resolved(key)
            folder = materialize(self.store, resolved)
            checksums = {f.path: f.sha256 for f in resolved.manifest.files}
            with self.lock:
                self.versions.setdefault(key, ResolvedAdapter(key, folder, checksums))
        with self.lock:
            self.resolved_at[key] = time.monotonic()
        if key != ref:  # a bare name or an alias: remember where it points, for refresh_s
            key = self._update_route(ref, key, resolved.version, read_at)
        return self.versions[key]

    def _keep_route(self, ref: str, exc: Exception) -> ResolvedAdapter | None:
        """A store outage while refreshing ``ref``: the last route stays (retried after
        ``refresh_s``), logged and counted; None when there is no route to keep."""
        with self.lock:
            route = self.routes.get(ref)
            known = self.versions.get(route.key) if route is not None else None
            if route is None or known is None:
                return None
            route.checked_at = time.monotonic()
            self.resolved_at[known.key] = route.checked_at
            self.counters["alias_refresh_failures"] += 1
        log.warning("store unreachable refreshing %s (%s); still routing to %s", ref, exc, known.key)
        return known

    def _update_route(self, ref: str, key: str, alias_version: str, read_at: float) -> str:
        """Record what the store said at ``read_at``; an explicit hot-swap holds until the
        alias moves, and a slower read never overwrites what a newer one recorded."""
        with self.lock:
            old = self.routes.get(ref)
            if old is not None and old.checked_at > read_at:
                return old.key if old.key in self.versions else key
            self.counters["alias_refreshes"] += old is not None
            if old is not None and old.explicit and old.alias_version in (None, alias_version):
                old.alias_version, old.checked_at = alias_version, read_at
                return old.key
            if old is not None and old.key != key:
                self.counters["alias_moves"] += 1
            self.routes[ref] = Route(key, alias_version, read_at)
            return key

    def route(self, name: str, key: str) -> None:
        """Hot-swap: new requests for ``name`` go to ``key`` (a resolved name@version) until
        the store's alias for ``name`` moves."""
        with self.lock:
            old = self.routes.get(name)
            alias_version = old.alias_version if old is not None else None
            self.routes[name] = Route(key, alias_version, time.monotonic(), explicit=True)

    def routed(self, name: str) -> str | None:
        with self.lock:
            route = self.routes.get(name)
            return route.key if route is not None else None

    def in_use(self) -> set[str]:
        """Versions routed to, or resolved in the last RECENT_S seconds."""
        recent = time.monotonic() - RECENT_S
        with self.lock:
            fresh = {k for k, at in self.resolved_at.items() if at > recent}
            return fresh | {r.key for r in self.routes.values()}


class ResolvesAdapters:
    """What every engine does with adapter refs (Loom's ``Engine`` and ``VLLMEngine``): resolve
    them through its ``resolver`` (store reads on a worker thread from the loop), and tell
    ``version_listeners`` of every concrete version before its files are fetched."""

    resolver: AdapterResolver
    version_listeners: list[Callable[[str], None]]

    def resolve_adapter(self, ref: str) -> ResolvedAdapter:
        """``ref`` -> the concrete version new requests get; may read the store (blocking)."""
        return self.resolver.resolve(ref)

    async def aresolve_adapter(self, ref: str) -> ResolvedAdapter:
        """As :meth:`resolve_adapter`, with any store I/O on a worker thread, never on the loop."""
        hit = self.resolver.cached(ref)
        return hit if hit is not None else await asyncio.to_thread(self.resolver.resolve, ref)

    def _on_resolved(self, key: str) -> None:
        for listener in self.version_listeners:
            listener(key)

    def unload_key(self, ref: str) -> str:
        """The concrete key an unload of ``ref`` means: a version as resolved, a bare name as
        routed now (or the name itself when nothing routes it)."""
        return self.resolve_adapter(ref).key if "@" in ref or "/" in ref else self.resolver.routed(ref) or ref
