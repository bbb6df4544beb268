"""The server's lease on the store: ``loom store gc`` never retires what this process serves.

Held: the base, and every adapter version resident in a slot, loading, waiting for a slot,
routed to by a bare name or alias, or resolved in the last ``RECENT_S`` seconds (a request
between resolution and loading). A version is held *before* its files are fetched
(``Engine.version_listeners``), so gc cannot retire it under a cold load.
"""

from __future__ import annotations

import logging
import threading

from loom.engine.serving import ServingEngine
from loom.store.leases import LeaseKeeper

log = logging.getLogger("loom.serve")


class ServingLeases:
    def __init__(self, engine: ServingEngine, refresh_s: float = 10.0) -> None:
        assert engine.store is not None
        self.engine, self.refresh_s = engine, refresh_s
        self.keeper = LeaseKeeper(engine.store, refresh_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a hold between a sync's snapshot and its write survives
        self._thread = threading.Thread(target=self._run, name="loom-leases", daemon=True)

    def start(self) -> None:
        """Start holding; a store where no lease can be written is served anyway (logged)."""
        self.engine.version_listeners.append(self._hold)
        self.sync()
        try:
            self.keeper.start()
        except Exception as exc:
            log.error("no store lease (gc may retire what this server uses): %s", exc)
        self._thread.start()

    def wanted(self) -> set[str]:
        base = self.engine.base_ref
        return self.engine.versions_in_use() | ({base} if base and "@" in base else set())

    def sync(self) -> None:
        """Hold exactly what the engine uses now (versions that left are released)."""
        with self._lock:
            wanted = self.wanted()
            try:
                self.keeper.set(wanted & self.keeper.held())
            except Exception as exc:  # a lease that cannot be written must not stop serving
                log.error("could not update the store lease: %s", exc)
            for ref in sorted(wanted - self.keeper.held()):
                self._hold_locked(ref)

    def _hold(self, key: str) -> None:
        with self._lock:
            self._hold_locked(key)

    def _hold_locked(self, key: str) -> None:
        try:  # one by one: a version retired meanwhile must not keep the others unleased
            self.keeper.hold(key)
        except Exception as exc:
            log.error("could not lease %s: %s", key, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.sync()

    def close(self) -> None:
        """Release everything (an engine given to create_app outlives this server)."""
        self._stop.set()
        if self._thread.is_alive():  # a sync in progress finishes before the lease goes
            self._thread.join(timeout=30)
        if self._hold in self.engine.version_listeners:
            self.engine.version_listeners.remove(self._hold)
        self.keeper.close()
