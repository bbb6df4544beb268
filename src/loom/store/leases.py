"""Leases: the versions a running process serves or is loading, so ``gc`` keeps them.

Each process that holds versions writes one small file, ``.leases/<pid>-<host>-<id>.json``,
through the store's backend (an atomic replace locally, a single PUT on object stores):
its owner, a heartbeat time and the concrete ``name@version`` refs it holds. A daemon
thread rewrites it every ``refresh_s``; ``close`` deletes it. A lease is stale when its
heartbeat is older than the TTL, or when its process is gone on this same host (another
host's processes cannot be seen, so there only the heartbeat counts); ``gc`` removes
stale lease files and never retires a version an active lease holds.

Race-free with ``gc``: ``hold`` checks that the version exists and records it under the
artifact's alias lock, and ``gc`` reads the leases under that same lock before it
retires, so once ``hold`` returns the version stays until it is dropped. (Object stores
offer no lock; there the window is the few milliseconds between gc's read and delete.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from loom.errors import LoomError, NotFoundError, RefError
from loom.refs import parse_ref
from loom.store.backends import owner_is_gone
from loom.store.store import Store

LEASES = ".leases"
DEFAULT_TTL_S = 60.0

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """One process's lease file as read back from the store."""

    rel: str
    pid: int
    host: str
    heartbeat: float
    refs: list[str]

    @property
    def holder(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    def is_stale(self, ttl_s: float, now: float | None = None) -> bool:
        age = (now if now is not None else time.time()) - self.heartbeat
        return owner_is_gone({"pid": self.pid, "host": self.host}, age, ttl_s)


def read_leases(store: Store) -> tuple[list[Lease], list[str]]:
    """Every lease file in the store, and the rels of those that cannot be read (damaged)."""
    leases: list[Lease] = []
    damaged: list[str] = []
    for entry in store.backend.list_dir(LEASES):
        if entry.startswith(".") or not entry.endswith(".json"):
            continue  # a writer's temporary file
        rel = f"{LEASES}/{entry}"
        try:
            raw = json.loads(store.backend.read_bytes(rel))
            leases.append(
                Lease(rel, int(raw["pid"]), str(raw["host"]), float(raw["heartbeat"]), list(raw["refs"]))
            )
        except FileNotFoundError:
            continue  # closed between the listing and the read
        except (ValueError, KeyError, TypeError):
            damaged.append(rel)
    return leases, damaged


def active_leases(store: Store, ttl_s: float = DEFAULT_TTL_S) -> dict[str, list[str]]:
    """Each leased concrete ref (``name@version``) mapped to its holders (``pid P on host H``)."""
    out: dict[str, list[str]] = {}
    now = time.time()
    for lease in read_leases(store)[0]:
        if not lease.is_stale(ttl_s, now):
            for ref in lease.refs:
                out.setdefault(ref, []).append(lease.holder)
    return out


def stale_leases(store: Store, ttl_s: float = DEFAULT_TTL_S) -> list[tuple[str, str]]:
    """``(rel, why)`` for every lease file that protects nothing any more."""
    leases, damaged = read_leases(store)
    now = time.time()
    found = [(rel, "damaged lease file") for rel in damaged]
    for lease in leases:
        if lease.is_stale(ttl_s, now):
            found.append((lease.rel, f"stale lease of {lease.holder}"))
    return found


def _concrete(ref: str) -> tuple[str, str]:
    """``(name, version)`` of a ``name@version`` ref."""
    parsed = parse_ref(ref)
    if parsed.kind != "store" or parsed.selector is None:
        raise RefError(f"cannot lease {ref!r}: give a concrete store ref 'name@version'")
    return parsed.name, parsed.selector


def _host_for_filename() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"


class LeaseKeeper:
    """The versions this process holds, kept in one lease file while it lives.

    Call ``hold`` before loading a version (it raises NotFoundError when the version is
    gone or the ref names an alias: resolve first), ``drop`` when no request uses it any
    more, ``start`` to keep the lease fresh and ``close`` at shutdown.
    """

    def __init__(self, store: Store, refresh_s: float = 10.0) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.rel = f"{LEASES}/{os.getpid()}-{_host_for_filename()}-{uuid.uuid4().hex}.json"
        self._refs: set[str] = set()
        # Serialises writes, so the last file written carries the latest set.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def held(self) -> set[str]:
        with self._lock:
            return set(self._refs)

    def hold(self, ref: str) -> None:
        self._add([ref])

    def drop(self, ref: str) -> None:
        ref = "@".join(_concrete(ref))
        with self._lock:
            if ref in self._refs:
                self._refs.discard(ref)
                self._write_locked()

    def set(self, refs: Iterable[str]) -> None:
        """Replace the held set: new refs are recorded as ``hold`` does, the rest dropped."""
        wanted = {"@".join(_concrete(ref)) for ref in refs}
        with self._lock:
            if self._refs - wanted:
                self._refs &= wanted
                self._write_locked()
        self._add(sorted(wanted - self.held()))

    def start(self) -> None:
        """Write the lease now and refresh it every ``refresh_s`` from a daemon thread."""
        with self._lock:
            self._check_open()
            self._write_locked()
            if self._thread is None:
                self._thread = threading.Thread(target=self._refresh, name="loom-lease", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop refreshing and delete the lease file: nothing is held any more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._closed = True
            self._refs.clear()
            self.store.backend.remove(self.rel)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _add(self, refs: Iterable[str]) -> None:
        by_name: dict[str, list[tuple[str, str]]] = {}
        for given in refs:
            name, version = _concrete(given)
            by_name.setdefault(name, []).append((f"{name}@{version}", version))
        for name, wanted in by_name.items():
            with self._lock:
                new = [(ref, version) for ref, version in wanted if ref not in self._refs]
            if not new:
                continue
            artifact = self.store.find(name)
            with self.store.alias_lock(artifact):
                for ref, version in new:
                    if not self.store.has_version(artifact, version):
                        raise NotFoundError(
                            f"cannot lease {ref}: no such version in store {self.store.url} (an alias "
                            f"or a retired version); resolve the ref first and lease the version"
                        )
                with self._lock:
                    self._check_open()
                    self._refs.update(ref for ref, _v in new)
                    self._write_locked()

    def _check_open(self) -> None:
        if self._closed:
            raise LoomError(f"lease {self.rel} is closed; make a new LeaseKeeper")

    def _write_locked(self) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "heartbeat": time.time(),
            "refs": sorted(self._refs),
        }
        self.store.backend.write_atomic(self.rel, json.dumps(record, indent=1).encode())

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                with self._lock:
                    if not self._closed:
                        self._write_locked()  # also recreates a file gc removed while we stalled
            except Exception:  # a transient store error must not end the refresher
                log.warning("could not refresh lease %s", self.rel, exc_info=True)
