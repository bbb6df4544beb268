"""The object-store backend against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from loom.errors import VersionExistsError  # noqa: E402
from loom.store import Store  # noqa: E402
from loom.store.gc import collect  # noqa: E402
from loom.store.importers import import_hf_dir  # noqa: E402
from loom.store.manifest import Source  # noqa: E402
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
    bucket = request.node.name.lower().replace("_", "-")[:50]
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
    from concurrent.futures import ThreadPoolExecutor

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
