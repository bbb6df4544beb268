"""Object-store backend (S3 and friends) through fsspec.

Object stores have no rename, so visibility comes from ordering: claim the
version with an exclusive create, upload every file, write ``manifest.json``
last (also exclusively). Readers only trust folders whose manifest exists.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from loom.errors import LoomError, VersionExistsError
from loom.store.backends import CLAIM, Backend, Leftover, Staging, owner_is_gone, owner_record
from loom.store.manifest import MANIFEST_NAME


def _is_exists_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, FileExistsError) or "PreconditionFailed" in text or "412" in text


class ObjectStaging(Staging):
    def __init__(self, backend: ObjectBackend, final_rel: str) -> None:
        self.backend = backend
        self.final_rel = final_rel
        self.dir = Path(tempfile.mkdtemp(prefix="loom-stage-"))

    def commit(self, final_rel: str, manifest: bytes) -> None:
        b = self.backend
        if b.exists(f"{final_rel}/{MANIFEST_NAME}"):
            raise VersionExistsError(f"{final_rel} already exists; versions are immutable")
        claim = json.dumps(owner_record()).encode()
        try:
            b.fs.pipe_file(b.full(f"{final_rel}/{CLAIM}"), claim, mode="create")
        except Exception as exc:
            if _is_exists_error(exc):
                raise VersionExistsError(
                    f"{final_rel} is being published by another process (or a crashed publish "
                    f"left a claim: run 'loom store gc'); choose another version"
                ) from exc
            raise
        try:
            if b.exists(f"{final_rel}/{MANIFEST_NAME}"):
                raise VersionExistsError(f"{final_rel} already exists; versions are immutable")
            for path in sorted(self.dir.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(self.dir).as_posix()
                    b.fs.put_file(str(path), b.full(f"{final_rel}/{rel}"))
            # The manifest is the commit record: written last, exclusively.
            b.fs.pipe_file(b.full(f"{final_rel}/{MANIFEST_NAME}"), manifest, mode="create")
        except VersionExistsError:
            b.fs.rm_file(b.full(f"{final_rel}/{CLAIM}"))
            raise
        with contextlib.suppress(Exception):
            b.fs.rm_file(b.full(f"{final_rel}/{CLAIM}"))
        self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ObjectBackend(Backend):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.prefix = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.prefix = self.prefix.rstrip("/")

    def full(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def read_bytes(self, rel: str) -> bytes:
        data: bytes = self.fs.cat_file(self.full(rel))
        return data

    def open_read(self, rel: str) -> BinaryIO:
        handle: BinaryIO = self.fs.open(self.full(rel), "rb")
        return handle

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self.full(rel)))

    def list_dir(self, rel: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.full(rel), detail=False)
        except FileNotFoundError:
            return []
        base = self.full(rel).rstrip("/") + "/"
        return sorted(e[len(base) :] if e.startswith(base) else e.rsplit("/", 1)[-1] for e in entries)

    def list_files(self, rel: str) -> list[str]:
        self.fs.invalidate_cache()
        base = self.full(rel).rstrip("/") + "/"
        return sorted(p[len(base) :] for p in self.fs.find(base) if p.startswith(base))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.full(rel)))

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.full(rel), data)  # a single PUT is atomic on S3

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.full(rel))

    def stage(self, final_rel: str) -> Staging:
        return ObjectStaging(self, final_rel)

    def retire(self, rel: str) -> None:
        # Manifest first: the version disappears in one step, the rest follows.
        self.fs.rm_file(self.full(f"{rel}/{MANIFEST_NAME}"))
        self.fs.rm(self.full(rel), recursive=True)

    def leftovers(self, stale_after_s: float) -> list[Leftover]:
        self.fs.invalidate_cache()
        found: list[Leftover] = []
        for claim in self.fs.glob(self.full(f"**/{CLAIM}")):
            folder = claim.rsplit("/", 1)[0]
            if self.fs.exists(f"{folder}/{MANIFEST_NAME}"):
                continue  # finished; only the claim removal was interrupted
            try:
                owner = json.loads(self.fs.cat_file(claim))
            except (OSError, ValueError):
                owner = None
            age = time.time() - float((owner or {}).get("started", 0))
            if owner_is_gone(owner, age, stale_after_s):
                size = sum(self.fs.du(folder, total=False).values())
                found.append(Leftover(folder, size, "unfinished publish"))
        return found

    def remove_leftover(self, item: Leftover) -> None:
        if self.fs.exists(f"{item.location}/{MANIFEST_NAME}"):
            self.fs.rm_file(f"{item.location}/{CLAIM}")
            return
        self.fs.rm(item.location, recursive=True)

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        # Object stores offer no cheap lock; alias files are single PUTs, so the
        # worst case of two simultaneous alias moves is last-writer-wins.
        yield


def open_backend(url: str, s3_endpoint_url: str | None = None) -> Backend:
    """The backend for a store root: a plain path, ``file://``, or an fsspec URL."""
    from loom.store.backends import LocalBackend

    if "://" not in url or url.startswith("file://"):
        return LocalBackend(url.removeprefix("file://"))
    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {}
    if protocol in {"s3", "s3a"} and s3_endpoint_url:
        options["client_kwargs"] = {"endpoint_url": s3_endpoint_url}
    try:
        return ObjectBackend(url, options)
    except ImportError as exc:
        raise LoomError(
            f"store URL {url!r} needs the {protocol!r} filesystem: pip install 'loom[s3]' ({exc})"
        ) from exc
