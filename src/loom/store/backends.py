"""Where store bytes live: the local filesystem, or an object store through fsspec.

Both give the same visible guarantee: a version exists only once its complete
``manifest.json`` is visible, and a crash at any point leaves no visible
partial version.

- Local: stage in ``<root>/.staging/<id>/payload``, fsync, then one
  ``rename`` makes the whole folder visible. fsspec's local filesystem exposes
  neither fsync nor an atomic directory rename, so this backend uses ``os``.
- Object stores (S3 via s3fs): there is no rename, so a publisher first claims
  the version with an exclusive create of ``.claim`` (``If-None-Match: *``),
  uploads the files, then writes the manifest last, also exclusively.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from loom.errors import VersionExistsError
from loom.store.manifest import MANIFEST_NAME

STAGING = ".staging"
TRASH = ".trash"
CLAIM = ".claim"
OWNER = "owner.json"


def owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def staging_name() -> str:
    """A fresh staging area's name, ``<uuid>-<pid>-<host>``: the owner is known from the
    moment the directory exists, so a publisher killed before it wrote its owner record
    still leaves an area ``gc`` can clear at once instead of after a minute."""
    return f"{uuid.uuid4().hex}-{os.getpid()}-{socket.gethostname()}"


def owner_from_name(name: str) -> dict[str, Any] | None:
    """The owner encoded by ``staging_name`` (None for other names)."""
    parts = name.split("-", 2)
    if len(parts) != 3 or len(parts[0]) != 32 or not parts[1].isdigit() or not parts[2]:
        return None
    return {"pid": int(parts[1]), "host": parts[2]}


def owner_is_gone(owner: dict[str, Any] | None, age_s: float, stale_after_s: float) -> bool:
    """True when a staging owner can no longer finish its publish."""
    if age_s > stale_after_s:
        return True
    if not owner:
        # Killed before it wrote its owner record; give it a minute to be sure.
        return age_s > 60
    if owner.get("host") != socket.gethostname():
        return False  # cannot see another host's processes: rely on age only
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Leftover:
    """A staging area no running publish owns (cleaned by ``gc``)."""

    location: str
    size: int
    reason: str


class Staging(ABC):
    """A private folder a publish writes into before it becomes visible."""

    dir: Path

    @abstractmethod
    def commit(self, final_rel: str, manifest: bytes) -> None:
        """Make ``dir`` visible at ``final_rel`` with ``manifest`` written last."""

    @abstractmethod
    def abort(self) -> None:
        """Throw the staged files away."""


class Backend(ABC):
    url: str

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def open_read(self, rel: str) -> BinaryIO: ...

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def list_dir(self, rel: str) -> list[str]:
        """Child names of a folder; [] when it does not exist."""

    @abstractmethod
    def list_files(self, rel: str) -> list[str]:
        """All files under a folder, as paths relative to it."""

    @abstractmethod
    def size(self, rel: str) -> int: ...

    @abstractmethod
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small file so readers see the old or the new bytes, never a mix."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Delete one small file (a lease); a file already gone is not an error."""

    @abstractmethod
    def stage(self, final_rel: str) -> Staging: ...

    @abstractmethod
    def retire(self, rel: str) -> None:
        """Make a version invisible first, then delete its bytes."""

    @abstractmethod
    def leftovers(self, stale_after_s: float) -> list[Leftover]: ...

    @abstractmethod
    def remove_leftover(self, item: Leftover) -> None: ...

    @abstractmethod
    def lock(self, rel: str) -> contextlib.AbstractContextManager[None]:
        """Serialise read-modify-write of small pointer files (aliases)."""

    def local_path(self, rel: str) -> Path | None:
        """A local path for ``rel`` when the bytes are on this machine."""
        return None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class LocalStaging(Staging):
    def __init__(self, root: Path) -> None:
        self.area = root / STAGING / staging_name()
        self.area.mkdir(parents=True)
        (self.area / OWNER).write_text(json.dumps(owner_record()))
        self.dir = self.area / "payload"
        self.dir.mkdir()
        self.root = root

    def commit(self, final_rel: str, manifest: bytes) -> None:
        target = self.dir / MANIFEST_NAME
        target.unlink(missing_ok=True)  # a retry under another version rewrites it
        target.write_bytes(manifest)
        for p in self.dir.rglob("*"):
            if p.is_file():
                p.chmod(0o444)  # finalized versions are immutable; make accidents loud
        _fsync_tree(self.dir)
        final = self.root / final_rel
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The one step that makes the version visible. rename() refuses a
            # non-empty target, so of two racing publishers exactly one wins.
            os.rename(self.dir, final)
        except OSError as exc:
            if final.exists():
                raise VersionExistsError(
                    f"{final_rel} already exists; versions are immutable: publish under a new "
                    f"version (or omit --version to get a fresh one)"
                ) from exc
            raise
        fsync_dir(final.parent)
        shutil.rmtree(self.area, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.area, ignore_errors=True)


class LocalBackend(Backend):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel

    def local_path(self, rel: str) -> Path | None:
        return self._p(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def open_read(self, rel: str) -> BinaryIO:
        return open(self._p(rel), "rb")

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def list_dir(self, rel: str) -> list[str]:
        p = self._p(rel)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def list_files(self, rel: str) -> list[str]:
        base = self._p(rel)
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if not p.is_dir())

    def size(self, rel: str) -> int:
        return self._p(rel).stat().st_size

    def write_atomic(self, rel: str, data: bytes) -> None:
        target = self._p(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def remove(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def stage(self, final_rel: str) -> Staging:
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalStaging(self.root)

    def retire(self, rel: str) -> None:
        trash = self.root / TRASH / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self._p(rel), trash)  # invisible in one step, then delete
        for p in trash.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
        shutil.rmtree(trash)

    def leftovers(self, stale_after_s: float) -> list[Leftover]:
        found: list[Leftover] = []
        now = time.time()
        staging = self.root / STAGING
        for area in sorted(staging.iterdir()) if staging.is_dir() else []:
            try:
                owner = json.loads((area / OWNER).read_text())
            except (OSError, ValueError):  # killed before (or while) writing it
                owner = owner_from_name(area.name)
            age = now - area.stat().st_mtime
            if owner_is_gone(owner, age, stale_after_s):
                why = "owner process is gone" if owner else "no owner record"
                found.append(Leftover(str(area), _tree_size(area), why))
        trash = self.root / TRASH
        for item in sorted(trash.iterdir()) if trash.is_dir() else []:
            found.append(Leftover(str(item), _tree_size(item), "interrupted delete"))
        return found

    def remove_leftover(self, item: Leftover) -> None:
        path = Path(item.location)
        for p in path.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
        shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        # Lock files live outside artifact folders so listings never see them.
        path = self.root / ".locks" / (rel.replace("/", "__") + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
