"""The object-store backend against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from loom.errors import IntegrityError, VersionExistsError  # noqa: E402
from loom.store import Resolved, Store  # noqa: E402
from loom.store.adapters import publish_adapter  # noqa: E402
from loom.store.gc import collect  # noqa: E402
from loom.store.hashing import sha256_bytes  # noqa: E402
from loom.store.importers import import_hf_dir  # noqa: E402
from loom.store.manifest import FileEntry, Source  # noqa: E402
from loom.store.verify import verify_store  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Store:
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("LOOM_S3_ENDPOINT_URL", s3_endpoint)
    # one bucket per test (parametrized ones too): a readable prefix and a hash of the test id
    slug = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:45].strip("-")
    bucket = f"{slug}-{hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return Store(f"s3://{bucket}/loom")


def _blob(store: Store, version: str, data: bytes) -> None:
    def fill(d: Path) -> None:
        (d / "blob.txt").write_bytes(data)

    store.publish("dataset", "blobs", fill=fill, source=Source(type="local", uri="t"), version=version)


def test_import_verify_alias_on_s3(s3_store: Store, tiny_dir: Path) -> None:
    m = import_hf_dir(s3_store, tiny_dir, "tiny-mistral", version="v1", alias="current")
    assert s3_store.resolve("tiny-mistral").version == "v1"
    assert m.base is not None and m.base.parameter_count > 0
    reports = verify_store(s3_store)
    assert [r.ok for r in reports] == [True]
    with pytest.raises(VersionExistsError):
        import_hf_dir(s3_store, tiny_dir, "tiny-mistral", version="v1")


def test_loading_from_s3_goes_through_a_verified_cache(
    s3_store: Store, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loom.models import load_model

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    import_hf_dir(s3_store, tiny_dir, "tiny-mistral", version="v1")
    loaded = load_model("tiny-mistral@v1", store=s3_store, device="cpu")
    assert loaded.model.config.hidden_size == 64


def test_unfinished_publish_is_invisible_and_gc_cleans(s3_store: Store) -> None:
    _blob(s3_store, "v1", b"good")
    fs, full = s3_store.backend.fs, s3_store.backend.full  # type: ignore[attr-defined]
    # a publisher that died after uploading data, before its manifest
    fs.pipe_file(full("datasets/blobs/versions/v2/.claim"), b'{"pid": 1, "host": "elsewhere", "started": 0}')
    fs.pipe_file(full("datasets/blobs/versions/v2/blob.txt"), b"partial")
    assert s3_store.versions(s3_store.find("blobs")) == ["v1"]
    with pytest.raises(VersionExistsError, match="another process"):
        _blob(s3_store, "v2", b"new")  # its claim still stands until gc
    report = collect(s3_store)
    assert len(report.leftovers) == 1
    assert not fs.exists(full("datasets/blobs/versions/v2/blob.txt"))
    _blob(s3_store, "v2", b"new")
    assert [r.ok for r in verify_store(s3_store)] == [True, True]


def test_same_version_race_has_one_winner_on_s3(s3_store: Store) -> None:
    def attempt(i: int) -> str:
        try:
            _blob(s3_store, "same", f"writer {i}".encode())
            return f"won {i}"
        except VersionExistsError:
            return "lost"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(attempt, range(6)))
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1
    r = s3_store.resolve("blobs@same")
    data = s3_store.backend.read_bytes(f"{r.rel}/blob.txt")
    assert data == f"writer {winners[0].split()[1]}".encode()
    assert all(x.ok for x in verify_store(s3_store))


# ------------------------------------------------------------------ the local cache of an object store


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _count_downloads(store: Store, monkeypatch: pytest.MonkeyPatch, rel: str) -> list[str]:
    """Record every read of a version's data files (any read primitive the backend has)."""
    seen: list[str] = []
    lock = threading.Lock()
    for method in ("open_read", "read_bytes"):
        original = getattr(store.backend, method)

        def counted(path: str, _original: Any = original) -> Any:
            if path.startswith(f"{rel}/") and not path.endswith("/manifest.json"):
                with lock:
                    seen.append(path)
            return _original(path)

        monkeypatch.setattr(store.backend, method, counted)
    return seen


def _assert_matches_manifest(folder: Path, resolved: Resolved) -> None:
    for f in resolved.manifest.files:
        assert hashlib.sha256((folder / f.path).read_bytes()).hexdigest() == f.sha256, f.path


def test_sixteen_concurrent_cold_loads_download_once(
    s3_store: Store, tiny_dir: Path, tiny_adapter_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loom.models.loading import materialize

    import_hf_dir(s3_store, tiny_dir, "tiny", version="v1", alias="current")
    publish_adapter(s3_store, tiny_adapter_dir, agent="t", name="lora", base="tiny@v1", version="v1")
    resolved = s3_store.resolve("lora@v1")
    reads = _count_downloads(s3_store, monkeypatch, resolved.rel)
    start = threading.Barrier(16)

    def load(_: int) -> Path:
        start.wait()
        return materialize(s3_store, resolved)

    with ThreadPoolExecutor(16) as pool:
        folders = list(pool.map(load, range(16)))
    assert len(set(folders)) == 1 and folders[0].is_relative_to(cache_dir)
    _assert_matches_manifest(folders[0], resolved)
    assert sorted(reads) == sorted(f"{resolved.rel}/{f.path}" for f in resolved.manifest.files)
    assert [p.name for p in folders[0].parent.iterdir() if ".tmp-" in p.name] == []


_PROCESS_LOAD = """
import sys, time
from pathlib import Path
from loom.models.loading import materialize
from loom.store import Store
store, ref, meet, n = Store(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
resolved = store.resolve(ref)
reads = []
original = store.backend.open_read
def slow_open(rel):
    reads.append(rel)
    time.sleep(0.3)  # a slow link: the other process arrives while this one downloads
    return original(rel)
store.backend.open_read = slow_open
(meet / str(time.time_ns())).touch()
while len(list(meet.iterdir())) < n:  # both have imported and resolved: load together
    time.sleep(0.01)
print(materialize(store, resolved), len(reads))
"""


def test_two_processes_cold_loading_one_version_download_once(
    s3_store: Store, cache_dir: Path, tmp_path: Path
) -> None:
    files = {f"part{i}.dat": os.urandom(300_000) for i in range(6)}

    def fill(d: Path) -> None:
        for name, data in files.items():
            (d / name).write_bytes(data)

    s3_store.publish("dataset", "parts", fill=fill, source=Source(type="local", uri="t"), version="v1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    meet = tmp_path / "meet"
    meet.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_LOAD, s3_store.url, "parts@v1", str(meet), "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [out.split() for out, _ in outs]
    assert len({folder for folder, _ in results}) == 1
    assert sum(int(n) for _, n in results) == len(files)  # one process downloaded, the other waited
    for name, data in files.items():
        assert (Path(results[0][0]) / name).read_bytes() == data


def test_two_stores_with_the_same_artifact_do_not_share_a_cache_entry(
    s3_store: Store, s3_endpoint: str, cache_dir: Path
) -> None:
    import boto3

    from loom.models.loading import materialize

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="other-bucket-same-names")
    other = Store("s3://other-bucket-same-names/loom")
    _blob(s3_store, "v1", b"first store")
    _blob(other, "v1", b"second store")
    first = materialize(s3_store, s3_store.resolve("blobs@v1"))
    second = materialize(other, other.resolve("blobs@v1"))
    assert first != second
    assert (first / "blob.txt").read_bytes() == b"first store"
    assert (second / "blob.txt").read_bytes() == b"second store"


def test_a_cache_file_edited_after_download_is_fetched_again(
    s3_store: Store, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loom.models.loading import materialize

    _blob(s3_store, "v1", b"the stored bytes")
    resolved = s3_store.resolve("blobs@v1")
    reads = _count_downloads(s3_store, monkeypatch, resolved.rel)
    folder = materialize(s3_store, resolved)
    assert len(reads) == 1
    # only touched: the full check finds the same bytes, nothing is downloaded
    os.utime(folder / "blob.txt", ns=(1, 1))
    assert materialize(s3_store, resolved) == folder and len(reads) == 1
    assert materialize(s3_store, resolved) == folder and len(reads) == 1  # fast path again
    # edited (same size): refetched, not served
    (folder / "blob.txt").write_bytes(b"THE STORED BYTES")
    assert (materialize(s3_store, resolved) / "blob.txt").read_bytes() == b"the stored bytes"
    assert len(reads) == 2
    (folder / "blob.txt").unlink()
    assert (materialize(s3_store, resolved) / "blob.txt").read_bytes() == b"the stored bytes"
    assert len(reads) == 3


def test_a_damaged_stored_file_is_refused_while_streaming(s3_store: Store, cache_dir: Path) -> None:
    from loom.models.loading import materialize

    _blob(s3_store, "v1", b"good bytes")
    resolved = s3_store.resolve("blobs@v1")
    fs, full = s3_store.backend.fs, s3_store.backend.full  # type: ignore[attr-defined]
    fs.pipe_file(full(f"{resolved.rel}/blob.txt"), b"evil bytes")
    with pytest.raises(IntegrityError, match=r"blob\.txt.*sha256.*re-publish"):
        materialize(s3_store, resolved)
    assert [p for p in cache_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("escape", ["../../../escaped.txt", "sub/../../../../escaped.txt", "/escaped.txt"])
def test_a_manifest_path_leaving_the_version_folder_is_refused(
    s3_store: Store, cache_dir: Path, tmp_path: Path, escape: str
) -> None:
    from loom.models.loading import materialize

    _blob(s3_store, "v1", b"x")
    resolved = s3_store.resolve("blobs@v1")
    fs, full = s3_store.backend.fs, s3_store.backend.full  # type: ignore[attr-defined]
    if escape.startswith("/"):
        escape = f"{tmp_path}{escape}"
    else:  # a real object there, so only the path check stands between it and the disk
        fs.pipe_file(full(f"{resolved.rel}/{escape}"), b"x")
    outside = FileEntry(path=escape, size=1, sha256=sha256_bytes(b"x"))
    crafted = resolved.manifest.model_copy(update={"files": [*resolved.manifest.files, outside]})
    fs.pipe_file(full(f"{resolved.rel}/manifest.json"), crafted.to_json())
    with pytest.raises(IntegrityError, match=r"escaped\.txt.*not a plain relative path"):
        materialize(s3_store, s3_store.resolve("blobs@v1"))
    assert list(tmp_path.rglob("escaped.txt")) == []  # within reach of every escape above
