"""SIGKILL publishers at random points; run publishers concurrently. Nothing partial, nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from loom.store import Store
from loom.store.gc import collect
from loom.store.verify import verify_store

PUBLISHER = str(Path(__file__).parent / "publisher.py")


def _spawn(
    root: Path, name: str, version: str, size_mb: float = 8, nfiles: int = 4, go: str = ""
) -> subprocess.Popen[str]:
    args = [sys.executable, PUBLISHER, str(root), name, version, str(size_mb), str(nfiles)]
    return subprocess.Popen([*args, go] if go else args, stdout=subprocess.PIPE, text=True)


def _run(root: Path, name: str, version: str) -> dict[str, str]:
    proc = _spawn(root, name, version)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return json.loads(out.splitlines()[-1])


def _content_sha(store: Store, ref: str) -> str:
    r = store.resolve(ref)
    digest = hashlib.sha256()
    for f in sorted(r.manifest.files, key=lambda f: f.path):
        digest.update(store.backend.read_bytes(f"{r.rel}/{f.path}"))
    return digest.hexdigest()


def test_sigkill_at_random_points_leaves_no_partial_version(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    baseline = [_run(root, "blobs", f"base{i}") for i in range(2)]
    store.set_alias("blobs", "current", "base1")
    timing = _spawn(root, "blobs", "timing")
    assert timing.stdout is not None and timing.stdout.readline().strip() == "ready"
    started = time.monotonic()  # from the end of the imports: kills land in the publish itself
    assert timing.wait(timeout=60) == 0
    duration = time.monotonic() - started

    rng = random.Random(1234)
    killed = attempts = 0
    # Kills are drawn over the measured publish time; a publisher that finished before its
    # kill shrinks that window (a cold first run can take twice as long as the rest), so
    # the test always gets its mid-publish kills however fast or slow this machine is.
    while killed < 15 and attempts < 60:
        proc = _spawn(root, "blobs", f"k{attempts}")
        attempts += 1
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        delay = rng.uniform(0.0, duration * 1.1)
        time.sleep(delay)
        if proc.poll() is not None:
            duration = max(delay * 0.8, 0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += proc.returncode == -signal.SIGKILL
        # whatever is visible is complete and verifies
        reports = verify_store(store, "blobs")
        assert all(r.ok for r in reports), [r.problems for r in reports if not r.ok]
    assert killed >= 15, f"only {killed} of {attempts} kills landed mid-publish; the test lost its teeth"

    versions = store.versions(store.find("blobs"))
    assert {"base0", "base1", "timing"} <= set(versions)
    assert store.resolve("blobs").version == "base1"
    for i, expected in enumerate(baseline):
        assert _content_sha(store, f"blobs@base{i}") == expected["sha"]

    staging = root / ".staging"
    assert any(staging.iterdir()), "kills should have left staging debris for gc"
    report = collect(store)
    assert report.leftovers and not any(staging.iterdir())
    assert all(r.ok for r in verify_store(store))


def test_concurrent_publishers_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    go = tmp_path / "go"
    distinct = [_spawn(root, "blobs", f"d{i}", 2, 2, str(go)) for i in range(5)]
    same = [_spawn(root, "blobs", "same", 2, 2, str(go)) for _ in range(5)]
    auto = [_spawn(root, "blobs", "auto", 1, 1, str(go)) for _ in range(3)]
    go.write_text("go")
    results = []
    for proc in distinct + same + auto:
        out, _ = proc.communicate(timeout=120)
        results.append((proc.returncode, json.loads(out.splitlines()[-1])))

    d, s, a = results[:5], results[5:10], results[10:]
    assert all(code == 0 for code, _ in d + a)
    winners = [r for code, r in s if code == 0]
    assert len(winners) == 1 and all(code == 3 for code, _ in s if code != 0)
    assert all("immutable" in r["error"] or "another process" in r["error"] for code, r in s if code == 3)
    assert len({r["version"] for _, r in a}) == 3  # automatic versions never collide

    for _code, r in d + a:
        assert _content_sha(store, f"blobs@{r['version']}") == r["sha"]
    assert _content_sha(store, "blobs@same") == winners[0]["sha"]
    assert all(r.ok for r in verify_store(store))
    assert not any((root / ".staging").iterdir())


def test_staging_killed_before_its_owner_record_is_cleared_at_once(tmp_path: Path) -> None:
    """The area's name carries its owner, so a publisher killed between creating the area
    and writing owner.json leaves nothing gc must wait a minute for."""
    import socket
    import uuid

    from loom.store.backends import STAGING

    store = Store(tmp_path / "store")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / "store" / STAGING
    host = socket.gethostname()
    gone = staging / f"{uuid.uuid4().hex}-{dead.pid}-{host}"  # its process has exited
    alive = staging / f"{uuid.uuid4().hex}-{os.getpid()}-{host}"  # this process: still publishing
    unnamed = staging / uuid.uuid4().hex  # no owner known: the one-minute grace applies
    for area in (gone, alive, unnamed):
        (area / "payload").mkdir(parents=True)
    report = collect(store)
    assert [Path(x.split(" (")[0]).name for x in report.leftovers] == [gone.name]
    assert not gone.exists() and alive.exists() and unnamed.exists()
