"""A running ``loom serve`` (a real process on loopback) follows the store: an alias move
reaches new requests within --alias-refresh while a stream started before finishes on its
version, rollback goes back, and ``loom store gc --keep 1`` meanwhile retires nothing the
server uses (its lease) or rollback needs (alias history). And more distinct adapters in
flight than slots are all answered 200, the waits counted in the metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import make_lora_adapter
from typer.testing import CliRunner

from loom.cli.main import app
from loom.serve.server import free_port, wait_healthy
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.importers import import_hf_dir

REFRESH_S = 0.5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("follow")
    store_root = root / "store"
    store = Store(store_root)
    import_hf_dir(store, tiny_dir, "tiny", version="v1")
    for i, version in enumerate(("v1", "v2", "v3")):
        folder = make_lora_adapter(tiny_dir, root / version, seed=20 + i)
        publish_adapter(store, folder, agent="a", name="intent", base="tiny@v1", version=version)
    for i in range(6):  # distinct adapters for the slot test
        folder = make_lora_adapter(tiny_dir, root / f"x{i}", seed=40 + i)
        publish_adapter(store, folder, agent="x", name=f"x{i}", base="tiny@v1", version="v1")
    port = free_port()
    env = {**os.environ, "LOOM_STORE": str(store_root), "HF_HUB_OFFLINE": "1"}
    args = ["--port", str(port), "--device", "cpu", "--max-batch-size", "8", "--max-seq-len", "256"]
    args += ["--kv-cache-mb", "16", "--max-adapters", "2", "--alias-refresh", str(REFRESH_S)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "serve", "--base", "tiny", *args, "--log-level", "warning"], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        yield url, store_root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def version_of(url: str, model: str = "intent") -> str:
    r = httpx.post(f"{url}/generate", json={"adapter": model, "prompt": "play", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def cli(store: Path, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--store", str(store)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_alias_moves_reach_the_server_and_gc_spares_what_it_uses(served: tuple[str, Path]) -> None:
    url, store = served
    assert version_of(url) == "intent@v1"  # the first version published became current
    assert version_of(url, "intent@v3") == "intent@v3"  # served, not aliased: only a lease keeps it
    fingerprints: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "intent", "messages": [{"role": "user", "content": "play"}], "max_tokens": 60}
        body |= {"stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    fp = json.loads(line[6:]).get("system_fingerprint")
                    fingerprints.extend([fp] if fp else [])
                    started.set()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert started.wait(60)
    cli(store, "store", "alias", "set", "intent", "current", "v2")
    moved = time.monotonic()
    while version_of(url) != "intent@v2":
        assert time.monotonic() - moved < REFRESH_S + 5, "the alias move never reached the server"
    reached_s = time.monotonic() - moved
    gc = cli(store, "store", "gc", "--keep", "1")
    streaming.join(120)
    assert fingerprints and set(fingerprints) == {"intent@v1"}  # the running stream stayed on v1
    assert reached_s < REFRESH_S + 2
    kept = Store(store).versions(Store(store).find("intent"))
    assert {"v1", "v2", "v3"} <= set(kept), gc  # history, current, lease
    assert "leased" in gc and "history" in gc
    cli(store, "store", "rollback", "intent")
    moved = time.monotonic()
    while version_of(url) != "intent@v1":
        assert time.monotonic() - moved < REFRESH_S + 5, "the rollback never reached the server"


def test_three_times_more_distinct_adapters_than_slots_all_answer(served: tuple[str, Path]) -> None:
    url, _store = served
    results: list[int] = []

    def one(i: int) -> None:
        body = {"adapter": f"x{i}", "prompt": "book a table", "max_tokens": 8}
        results.append(httpx.post(f"{url}/generate", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]  # 2 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [200] * 6
    metrics = httpx.get(f"{url}/metrics").text
    waits = [line for line in metrics.splitlines() if line.startswith("loom_adapter_slot_waits")]
    assert waits and float(waits[0].rsplit(" ", 1)[1]) >= 1, waits
