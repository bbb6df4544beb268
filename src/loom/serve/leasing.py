"""The server's lease on the store: ``loom store gc`` never retires what this process serves.

Held: the base, and every adapter version resident in a slot, loading, waiting for a slot,
routed to by a bare name or alias, or resolved in the last ``RECENT_S`` seconds (a request
between resolution and loading). A version is held *before* its files are fetched
(``Engine.version_listeners``), so gc cannot retire it under a cold load.
"""

from __future__ import annotations

import logging
import threading

from loom.engine import Engine
from loom.store.leases import LeaseKeeper

log = logging.getLogger("loom.serve")


class ServingLeases:
    def __init__(self, engine: Engine, refresh_s: float = 10.0) -> None:
        assert engine.store is not None
        self.engine, self.refresh_s = engine, refresh_s
        self.keeper = LeaseKeeper(engine.store, refresh_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loom-leases", daemon=True)

    def start(self) -> None:
        self.engine.version_listeners.append(self._hold)
        self.sync()
        self.keeper.start()
        self._thread.start()

    def wanted(self) -> set[str]:
        base = self.engine.base_ref
        return self.engine.versions_in_use() | ({base} if base and "@" in base else set())

    def sync(self) -> None:
        """Hold exactly what the engine uses now (versions that left are released)."""
        try:
            self.keeper.set(self.wanted())
        except Exception as exc:  # a lease that cannot be written must not stop serving
            log.error("could not update the store lease: %s", exc)

    def _hold(self, key: str) -> None:
        self.keeper.hold(key)  # errors reach the resolving request: better than loading unleased

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.sync()

    def close(self) -> None:
        """Release everything (an engine given to create_app outlives this server)."""
        self._stop.set()
        if self._hold in self.engine.version_listeners:
            self.engine.version_listeners.remove(self._hold)
        self.keeper.close()
