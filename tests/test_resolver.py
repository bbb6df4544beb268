"""The adapter resolver under a flaky or racing store, and the cache's eviction plan
(the tiny store from ``engine_store``; no model runs)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import loom.engine.resolver as resolver_mod
from loom.engine.adapters import AdapterCache, AdapterWeights, Resident
from loom.engine.resolver import AdapterResolver
from loom.errors import LoomError, NotFoundError
from loom.store import Store


def _resolver(store: Store) -> AdapterResolver:
    info = store.resolve("tiny@v1").manifest.base
    assert info is not None
    return AdapterResolver(store, info.fingerprint, refresh_s=0.0)  # every bare name re-reads the store


def test_a_store_outage_keeps_the_last_route(engine_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    res = _resolver(engine_store)
    assert res.resolve("qv4").key == "qv4@v1"

    def down(*_: Any) -> Any:
        raise ConnectionError("object store unreachable")

    monkeypatch.setattr(resolver_mod, "resolve_adapter", down)
    assert res.resolve("qv4").key == "qv4@v1"  # served from the last route, not failed
    assert res.counters["alias_refresh_failures"] == 1
    with pytest.raises(ConnectionError):  # never resolved before: nothing to fall back to
        res.resolve("o2")

    def gone(*_: Any) -> Any:
        raise NotFoundError("no adapter qv4")

    monkeypatch.setattr(resolver_mod, "resolve_adapter", gone)
    with pytest.raises(LoomError, match="no adapter qv4"):  # the store answered: that is the answer
        res.resolve("qv4")


def test_a_slow_read_never_overwrites_a_newer_route(
    engine_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread 1 reads the alias (v1) and stalls; the alias moves to v2 and thread 2 reads it;
    thread 1's stale answer then lands: the route must stay on v2."""
    res = _resolver(engine_store)
    real = resolver_mod.resolve_adapter
    stalled, release = threading.Event(), threading.Event()

    def slow_first(store: Store, ref: str, *rest: Any) -> Any:
        answer = real(store, ref, *rest)
        if threading.current_thread().name == "slow":
            stalled.set()
            release.wait(5)
        return answer

    monkeypatch.setattr(resolver_mod, "resolve_adapter", slow_first)
    slow_result: list[str] = []
    slow = threading.Thread(target=lambda: slow_result.append(res.resolve("qv4").key), name="slow")
    slow.start()
    assert stalled.wait(5)
    engine_store.set_alias("qv4", "current", "v2")
    try:
        assert res.resolve("qv4").key == "qv4@v2"
        release.set()
        slow.join(5)
        assert slow_result == ["qv4@v2"]  # the late reader is told the newer answer too
        assert res.routed("qv4") == "qv4@v2"
    finally:
        release.set()
        engine_store.set_alias("qv4", "current", "v1")


def test_a_cached_answer_keeps_its_version_in_use(
    engine_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = _resolver(engine_store)
    res.resolve("o2@v1")
    monkeypatch.setattr(resolver_mod, "RECENT_S", 0.0)
    assert "o2@v1" not in res.in_use()
    monkeypatch.setattr(resolver_mod, "RECENT_S", 60.0)
    res.resolved_at["o2@v1"] = -1e9  # resolved long ago ...
    assert "o2@v1" not in res.in_use()
    assert res.cached("o2@v1") is not None  # ... and asked for again: in use again
    assert "o2@v1" in res.in_use()


class _Runner:
    def __init__(self) -> None:
        self.lora_modules: dict[str, Any] = {}


def _weights(key: str, nbytes: int) -> AdapterWeights:
    return AdapterWeights(key, {}, nbytes, 4, 0.0)


def test_a_failed_install_evicts_nothing(engine_store: Store) -> None:
    """Two idle residents of 40 bytes and a busy one of 40; a 90-byte adapter cannot fit even
    after evicting both idle ones: nothing is evicted and the caller is told to wait."""
    runner: Any = _Runner()
    cache = AdapterCache(runner, _resolver(engine_store), max_slots=4, max_bytes=130, max_rank=8)
    for slot, key in enumerate(("a@v1", "b@v1", "busy@v1")):
        cache.resident[key] = Resident(key, slot, 40, 4)
    cache.resident["busy@v1"].refs = 1
    with pytest.raises(LoomError, match="serve running requests"):
        cache.install(_weights("big@v1", 95))
    assert set(cache.resident) == {"a@v1", "b@v1", "busy@v1"} and cache.counters["evictions"] == 0
    cache.install(_weights("mid@v1", 50))  # fits after evicting the least recently used idle one only
    assert cache.counters["evictions"] == 1 and "mid@v1" in cache.resident
