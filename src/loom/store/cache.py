"""The local cache of object-store versions (``LOOM_CACHE``, default ``~/.cache/loom``).

Layout: ``<cache>/<store key>/<version rel>/`` holds the version's files, its
``manifest.json`` and ``.loom-cache.json`` (the size and mtime of every file when
the entry was written). The store key is a readable slug of the store URL plus a
hash of its identity (URL and endpoint), so two buckets with the same artifact
names never share an entry.

Guarantees:

- one download per version however many threads or processes ask at once: an
  exclusive lock per version (a thread lock plus ``flock`` on ``.<version>.lock``)
  is held while materializing, and a download goes to a uuid-named folder that
  one ``rename`` makes visible;
- files stream from the backend in chunks, hashed as they are written, and a
  file whose sha256 or size differs from the manifest is an ``IntegrityError``;
- every use re-checks the entry: sizes and mtimes against the record (cheap),
  a full sha256 check when they differ, and a damaged entry is downloaded again;
- manifest paths must stay inside the version folder (no absolute paths, no
  ``..``), checked before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from loom.errors import IntegrityError
from loom.store.backends import fsync_dir
from loom.store.hashing import CHUNK, sha256_stream
from loom.store.manifest import MANIFEST_NAME, FileEntry, parse_manifest
from loom.store.store import Resolved, Store

RECORD = ".loom-cache.json"

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("LOOM_CACHE") or Path.home() / ".cache" / "loom")


def store_key(store: Store) -> str:
    """``<slug of the URL>-<12 hex of URL + endpoint>``: readable, and distinct per store."""
    identity = store.url
    options: dict[str, Any] = getattr(getattr(store.backend, "fs", None), "storage_options", {}) or {}
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
    if endpoint:
        identity += f" @ {endpoint}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", store.url).strip("-")[:40]
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def entry_path(store: Store, resolved: Resolved) -> Path:
    return cache_root() / store_key(store) / resolved.rel


def materialize(store: Store, resolved: Resolved) -> Path:
    """A local folder with the version's verified files (object stores go through the cache)."""
    local = store.backend.local_path(resolved.rel)
    if local is not None:
        return local
    check_paths(resolved)
    target = entry_path(store, resolved)
    if _fast_ok(target, resolved):
        return target  # the common case: no lock, a stat per file
    with _version_lock(target):
        if _fast_ok(target, resolved):
            return target  # another thread or process finished it while we waited
        if target.exists() and _full_ok(target, resolved):
            return target
        _clear_leftovers(target)
        _download(store, resolved, target)
    return target


def check_paths(resolved: Resolved) -> None:
    """Refuse manifest paths that would land outside the version folder."""
    for f in resolved.manifest.files:
        p = PurePosixPath(f.path)
        if (
            not f.path
            or "\\" in f.path
            or "\x00" in f.path
            or p.is_absolute()
            or any(part in ("..", ".", "") for part in f.path.split("/"))
            or f.path in (MANIFEST_NAME, RECORD)
        ):
            raise IntegrityError(
                f"{resolved.ref}: manifest lists file {f.path!r}, which is not a plain relative path "
                f"inside the version folder (absolute, '..', or a reserved name); refusing to write "
                f"it: the manifest is damaged or crafted, re-publish the version from a trusted source"
            )


@contextlib.contextmanager
def _version_lock(target: Path) -> Iterator[None]:
    """Exclusive per version: threads wait on a lock, processes on ``flock``."""
    lock_file = target.with_name(f".{target.name}.lock")
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(str(lock_file), threading.Lock())
    with thread_lock:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _read_record(target: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((target / RECORD).read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _fast_ok(target: Path, resolved: Resolved) -> bool:
    """True when every file has the size and mtime recorded when the entry was written."""
    record = _read_record(target)
    if record is None or record.get("manifest") != _manifest_digest(resolved):
        return False
    stats: dict[str, list[int]] = record.get("files", {})
    for f in resolved.manifest.files:
        try:
            st = (target / f.path).stat()
        except OSError:
            return False
        if stats.get(f.path) != [f.size, st.st_mtime_ns] or st.st_size != f.size:
            return False
    return True


def _full_ok(target: Path, resolved: Resolved) -> bool:
    """Hash every file; when all match (only mtimes moved), refresh the record."""
    for f in resolved.manifest.files:
        try:
            with (target / f.path).open("rb") as fh:
                if sha256_stream(fh) != (f.sha256, f.size):
                    return False
        except OSError:
            return False
    _write_record(target, resolved)
    return True


def _manifest_digest(resolved: Resolved) -> str:
    return hashlib.sha256(resolved.manifest.to_json()).hexdigest()


def _write_record(folder: Path, resolved: Resolved) -> None:
    files = {f.path: [f.size, (folder / f.path).stat().st_mtime_ns] for f in resolved.manifest.files}
    record = {"ref": resolved.ref, "manifest": _manifest_digest(resolved), "files": files}
    tmp = folder / f"{RECORD}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / RECORD)


def _clear_leftovers(target: Path) -> None:
    """Under the version lock nobody else writes this version: whatever is there goes."""
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        trash = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        os.replace(target, trash)  # out of sight in one step, then deleted
        shutil.rmtree(trash, ignore_errors=True)


def _download(store: Store, resolved: Resolved, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        for f in resolved.manifest.files:
            _stream_file(store, resolved, f, tmp / f.path)
        manifest = store.backend.read_bytes(f"{resolved.rel}/{MANIFEST_NAME}")
        if parse_manifest(manifest, f"{store.url}/{resolved.rel}") != resolved.manifest:
            raise IntegrityError(
                f"{resolved.ref}: the manifest in {store.url} changed while it was downloaded; "
                f"versions are immutable, so the store was rewritten: run 'loom store verify'"
            )
        (tmp / MANIFEST_NAME).write_bytes(manifest)
        _write_record(tmp, resolved)
        fsync_dir(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stream_file(store: Store, resolved: Resolved, f: FileEntry, dest: Path) -> None:
    """Copy one file in chunks, hashing as it goes; stop as soon as it is too long."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with store.backend.open_read(f"{resolved.rel}/{f.path}") as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > f.size:
                break
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if size != f.size or digest.hexdigest() != f.sha256:
        got = f"more than {f.size} bytes" if size > f.size else f"{size} bytes, sha256 {digest.hexdigest()}"
        raise IntegrityError(
            f"{resolved.ref}: file {f.path} in {store.url} has {got}; the manifest says {f.size} "
            f"bytes, sha256 {f.sha256}. The stored copy is damaged: run 'loom store verify "
            f"{resolved.ref}' and re-publish the version"
        )
