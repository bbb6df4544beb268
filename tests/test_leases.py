"""Leases: gc never retires what a running process serves or loads, nor while an alias moves."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loom.errors import NotFoundError, RefError
from loom.store import Store
from loom.store.gc import collect
from loom.store.leases import LEASES, LeaseKeeper, active_leases
from loom.store.manifest import Source

HAVE_S3 = all(importlib.util.find_spec(m) for m in ("s3fs", "moto", "boto3"))
if HAVE_S3:
    from test_s3_backend import s3_endpoint, s3_store  # noqa: F401  (fixtures)


def _blobs(store: Store, *versions: str) -> None:
    for v in versions:

        def fill(d: Path, v: str = v) -> None:
            (d / "blob.txt").write_bytes(v.encode())

        store.publish("dataset", "data", fill=fill, source=Source(type="local", uri="t"), version=v)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lease(store: Store, name: str, pid: int, host: str, heartbeat: float, refs: list[str]) -> str:
    rel = f"{LEASES}/{name}.json"
    record = {"pid": pid, "host": host, "heartbeat": heartbeat, "refs": refs}
    store.backend.write_atomic(rel, json.dumps(record).encode())
    return rel


def _gc_keeps_a_leased_version_until_the_keeper_closes(store: Store) -> None:
    _blobs(store, "v1", "v2", "v3")  # v1 is current (the first version), v3 the newest
    keeper = LeaseKeeper(store)
    keeper.start()
    keeper.hold("data@v2")
    assert active_leases(store) == {"data@v2": [f"pid {os.getpid()} on host {socket.gethostname()}"]}
    report = collect(store, keep=1)
    assert report.versions == []
    assert report.kept == [
        "dataset data@v1 kept: alias current points at it",
        f"dataset data@v2 kept: leased by pid {os.getpid()} on host {socket.gethostname()}",
    ]
    keeper.close()
    assert active_leases(store) == {} and store.backend.list_dir(LEASES) == []
    assert collect(store, keep=1).versions == ["data@v2"]


def test_gc_keeps_a_leased_version_until_the_keeper_closes(store: Store) -> None:
    _gc_keeps_a_leased_version_until_the_keeper_closes(store)


@pytest.mark.skipif(not HAVE_S3, reason="needs s3fs, moto and boto3")
def test_leases_work_on_an_object_store(s3_store: Store) -> None:
    _gc_keeps_a_leased_version_until_the_keeper_closes(s3_store)


def test_stale_leases_protect_nothing_and_gc_removes_them(store: Store) -> None:
    _blobs(store, "v1", "v2", "v3", "v4")
    now = time.time()
    dead = _write_lease(store, "dead", _dead_pid(), socket.gethostname(), now, ["data@v2"])
    expired = _write_lease(store, "expired", 1, "elsewhere", now - 3600, ["data@v3"])
    # another host's process cannot be checked: a fresh heartbeat is all there is to go by
    _write_lease(store, "remote", 1, "elsewhere", now, ["data@v4"])
    assert active_leases(store) == {"data@v4": ["pid 1 on host elsewhere"]}
    dry = collect(store, keep=1, dry_run=True)
    assert [x.split(" (")[0] for x in dry.leases] == [dead, expired]
    assert store.backend.exists(dead) and store.backend.exists(expired)
    report = collect(store, keep=1)
    assert report.versions == ["data@v2", "data@v3"]
    assert not store.backend.exists(dead) and not store.backend.exists(expired)
    assert store.backend.list_dir(LEASES) == ["remote.json"]


def test_hold_takes_concrete_existing_versions_and_set_replaces(store: Store) -> None:
    _blobs(store, "v1", "v2")
    with LeaseKeeper(store) as keeper:
        with pytest.raises(NotFoundError, match="cannot lease data@current"):
            keeper.hold("data@current")  # an alias: resolve it first
        with pytest.raises(NotFoundError, match="cannot lease data@v9"):
            keeper.hold("data@v9")
        with pytest.raises(RefError, match="concrete store ref"):
            keeper.hold("data")
        keeper.set(["data@v1", "data@v2"])
        keeper.set(["data@v2"])
        assert keeper.held() == {"data@v2"}
        assert active_leases(store) == {"data@v2": [f"pid {os.getpid()} on host {socket.gethostname()}"]}
        keeper.drop("data@v2")
        assert keeper.held() == set() and active_leases(store) == {}


def test_the_keeper_refreshes_its_heartbeat_and_recreates_a_removed_file(store: Store) -> None:
    _blobs(store, "v1")
    with LeaseKeeper(store, refresh_s=0.05) as keeper:
        keeper.hold("data@v1")
        first = json.loads(store.backend.read_bytes(keeper.rel))["heartbeat"]
        time.sleep(0.3)
        assert json.loads(store.backend.read_bytes(keeper.rel))["heartbeat"] > first
        store.backend.remove(keeper.rel)  # as gc does to a lease it found stale
        time.sleep(0.3)
        assert active_leases(store, ttl_s=5) == {
            "data@v1": [f"pid {os.getpid()} on host {socket.gethostname()}"]
        }
    assert not store.backend.exists(keeper.rel)


def test_gc_retires_under_the_lock_alias_moves_and_leases_take(store: Store) -> None:
    _blobs(store, "v1", "v2", "v3")
    artifact = store.find("data")
    outcome: dict[str, object] = {}

    def hold() -> None:
        try:
            LeaseKeeper(store).hold("data@v2")
            outcome["hold"] = "held"
        except NotFoundError as exc:
            outcome["hold"] = str(exc)

    def alias_set() -> None:
        try:
            store.set_alias("data", "champion", "v2")
            outcome["alias"] = "set"
        except NotFoundError as exc:
            outcome["alias"] = str(exc)

    def gc() -> None:
        outcome["gc"] = collect(store, keep=1).versions

    with store.alias_lock(artifact):  # stands in for a gc mid-retire of data
        threads = [threading.Thread(target=f) for f in (hold, alias_set, gc)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert outcome == {}  # all three wait for the lock
        store.backend.retire(artifact.version_rel("v2"))
    for t in threads:
        t.join(timeout=30)
    assert "no such version" in str(outcome["hold"]) and "does not exist" in str(outcome["alias"])
    assert outcome["gc"] == []  # v1 is current, v2 is gone, v3 is the newest
