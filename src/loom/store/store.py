"""The store: versioned, checksummed, crash-safe artifacts with aliases.

This is the registry; there is no second database. Everything here is derived
from the manifests and alias files the backend holds.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loom import __version__
from loom.config import settings
from loom.errors import LoomError, NotFoundError, RefError, VersionExistsError
from loom.refs import DEFAULT_ALIAS, Ref, parse_ref, validate_name
from loom.store.aliases import AliasFile, current_user, event, parse_alias
from loom.store.backends import Backend
from loom.store.hashing import Progress, sha256_stream
from loom.store.layout import KIND_DIRS, ArtifactPath
from loom.store.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Kind,
    Manifest,
    Source,
    parse_manifest,
)
from loom.store.object_backend import open_backend

# Never stored: these formats unpickle arbitrary code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULTS_FILE = "defaults.json"


@dataclass
class Resolved:
    """A ref resolved to one concrete, visible version."""

    artifact: ArtifactPath
    version: str
    manifest: Manifest

    @property
    def rel(self) -> str:
        return self.artifact.version_rel(self.version)

    @property
    def ref(self) -> str:
        return f"{self.artifact.name}@{self.version}"


@dataclass
class ArtifactSummary:
    artifact: ArtifactPath
    versions: list[str]
    aliases: dict[str, str] = field(default_factory=dict)


def auto_version(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("v%Y%m%d-%H%M")


class Store:
    def __init__(self, root: str | Path | None = None, backend: Backend | None = None) -> None:
        cfg = settings()
        self.backend = backend or open_backend(str(root or cfg.store_root), cfg.s3_endpoint_url)

    @property
    def url(self) -> str:
        return self.backend.url

    # ---------------------------------------------------------------- lookup
    def artifacts(self) -> list[ArtifactPath]:
        found: list[ArtifactPath] = []
        b = self.backend
        for kind, top in KIND_DIRS.items():
            if kind == "adapter":
                for agent in b.list_dir(top):
                    found += [ArtifactPath(kind, n, agent) for n in b.list_dir(f"{top}/{agent}")]
            else:
                found += [ArtifactPath(kind, n) for n in b.list_dir(top)]
        return [a for a in found if not a.name.startswith(".")]

    def find(self, name: str) -> ArtifactPath:
        validate_name(name)
        # Looked up where the name can be (each kind's folder, each agent's for adapters),
        # not by listing every artifact: with 1,000 adapters in the store the listing was
        # 12 of an adapter cold load's 28 ms (every engine load resolves its ref).
        b = self.backend
        matches: list[ArtifactPath] = []
        for kind, top in KIND_DIRS.items():
            agents: list[str | None] = list(b.list_dir(top)) if kind == "adapter" else [None]
            for agent in agents:
                found = ArtifactPath(kind, name, agent)
                if b.list_dir(found.rel):  # an artifact's folder is never empty (versions/)
                    matches.append(found)
        if not matches:
            raise NotFoundError(
                f"no artifact named {name!r} in store {self.url}; see 'loom store ls' "
                f"(or import one with 'loom store import-base')"
            )
        if len(matches) > 1:  # publish refuses this, but a hand-edited store may have it
            raise RefError(f"{name!r} is ambiguous: {[m.describe() for m in matches]}")
        return matches[0]

    def versions(self, artifact: ArtifactPath) -> list[str]:
        """Visible versions (their manifest exists), oldest first."""
        out: list[tuple[str, str]] = []
        for v in self.backend.list_dir(f"{artifact.rel}/versions"):
            rel = f"{artifact.version_rel(v)}/{MANIFEST_NAME}"
            if self.backend.exists(rel):
                try:
                    created = json.loads(self.backend.read_bytes(rel)).get("created_at", "")
                except ValueError:
                    created = ""
                out.append((str(created), v))
        return [v for _c, v in sorted(out)]

    def manifest(self, artifact: ArtifactPath, version: str) -> Manifest:
        rel = f"{artifact.version_rel(version)}/{MANIFEST_NAME}"
        if not self.backend.exists(rel):
            raise NotFoundError(f"{artifact.name}@{version} does not exist in store {self.url}")
        return parse_manifest(self.backend.read_bytes(rel), f"{self.url}/{rel}")

    def resolve(self, ref: str | Ref) -> Resolved:
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.kind != "store":
            raise RefError(f"{parsed} is not a store ref; give 'name' or 'name@version'")
        artifact = self.find(parsed.name)
        tag = parsed.tag
        if self.has_version(artifact, tag):
            return Resolved(artifact, tag, self.manifest(artifact, tag))
        alias = self.get_alias(artifact, tag)
        if alias is None:
            versions = self.versions(artifact)
            hint = f"available versions: {', '.join(versions)}" if versions else "it has no versions"
            if tag == DEFAULT_ALIAS and parsed.selector is None:
                raise NotFoundError(
                    f"{parsed.name} has no '{DEFAULT_ALIAS}' alias; name a version "
                    f"({hint}) or run 'loom store alias set {parsed.name} current VERSION'"
                )
            raise NotFoundError(f"{parsed.name}@{tag}: no such version or alias; {hint}")
        return Resolved(artifact, alias.version, self.manifest(artifact, alias.version))

    def summary(self, artifact: ArtifactPath) -> ArtifactSummary:
        aliases = {n: f.version for n, f in self.aliases(artifact).items()}
        return ArtifactSummary(artifact, self.versions(artifact), aliases)

    def summaries(self, kind: Kind | None = None) -> list[ArtifactSummary]:
        return [self.summary(a) for a in self.artifacts() if not kind or a.kind == kind]

    # ---------------------------------------------------------------- publish
    def publish(
        self,
        kind: Kind,
        name: str,
        *,
        fill: Callable[[Path], None],
        describe: Callable[[Path], dict[str, Any]] | None = None,
        source: Source,
        version: str | None = None,
        agent: str | None = None,
        license: str | None = None,
        description: str | None = None,
        tags: list[str] | None = None,
        alias: str | None = None,
        progress: Callable[[int], Progress | None] | None = None,
    ) -> Manifest:
        """Stage, fill, hash, write the manifest, then make the version visible atomically.

        ``fill(folder)`` writes the payload; ``describe(folder)`` returns extra
        manifest fields (``base=``, ``adapter=``...) computed from those files.
        ``progress(total_bytes)`` may return a callback for hashing progress.
        """
        artifact = self._new_artifact_path(kind, name, agent)
        if version is not None:
            validate_name(version, "version")
            if self.has_version(artifact, version):
                raise VersionExistsError(
                    f"{name}@{version} already exists and versions are immutable; publish "
                    f"under a new --version (or omit it for a fresh vYYYYMMDD-HHMM)"
                )
        staging = self.backend.stage(artifact.rel)
        try:
            fill(staging.dir)
            self._reject_pickles(staging.dir)
            extra = describe(staging.dir) if describe else {}
            files = self._hash_payload(staging.dir, progress)
            base = dict(
                kind=kind,
                name=name,
                agent=agent,
                source=source,
                license=license,
                description=description,
                tags=tags or [],
                files=files,
                created_by=f"{current_user()}@{socket.gethostname()} loom/{__version__}",
                **extra,
            )
            manifest = self._commit(staging, artifact, version, base)
        except BaseException:
            staging.abort()
            raise
        if alias:
            self.set_alias(name, alias, manifest.version)
        else:
            self._first_is_current(artifact, manifest.version)
        return manifest

    def _first_is_current(self, artifact: ArtifactPath, version: str) -> None:
        """Point ``current`` at the first version of a new artifact, so its bare name works.

        Later versions move ``current`` only when asked (``--alias current``). "First" is
        the oldest visible version, checked under the alias lock: of two racing first
        publishers exactly one sets it, and a name whose first version was published
        under another alias keeps no ``current`` until one is set.
        """
        with self.alias_lock(artifact):
            if self.get_alias(artifact, DEFAULT_ALIAS) is None and self.versions(artifact)[:1] == [version]:
                self._move_alias(artifact, DEFAULT_ALIAS, version)

    def _commit(
        self, staging: Any, artifact: ArtifactPath, version: str | None, fields: dict[str, Any]
    ) -> Manifest:
        """Commit under ``version``, or under the first free automatic version."""
        for attempt in range(1, 1000):
            if version is None:
                stem = auto_version()
                chosen = stem if attempt == 1 else f"{stem}-{attempt}"
                if self.backend.exists(artifact.version_rel(chosen)):
                    continue
            else:
                chosen = version
            manifest = Manifest(version=chosen, created_at=datetime.now(timezone.utc), **fields)
            try:
                staging.commit(artifact.version_rel(chosen), manifest.to_json())
                return manifest
            except VersionExistsError:
                if version is not None:
                    raise
        raise LoomError(f"could not find a free version for {artifact.name}")

    def _new_artifact_path(self, kind: Kind, name: str, agent: str | None) -> ArtifactPath:
        validate_name(name)
        if kind == "adapter":
            if not agent:
                raise LoomError(f"adapter {name!r} needs an agent: pass --agent AGENT")
            validate_name(agent, "agent")
        for other in self.artifacts():
            if other.name == name and (other.kind != kind or other.agent != (agent or None)):
                raise LoomError(
                    f"name {name!r} is already used by {other.describe()}; names are unique "
                    f"across the store so a bare ref is never ambiguous: choose another name"
                )
        return ArtifactPath(kind, name, agent if kind == "adapter" else None)

    @staticmethod
    def _reject_pickles(folder: Path) -> None:
        bad = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if bad:
            raise LoomError(
                f"refusing pickle files {bad}: Loom stores safetensors only (pickle runs code "
                f"on load). Convert with model.save_pretrained(dir, safe_serialization=True)"
            )

    @staticmethod
    def _hash_payload(folder: Path, progress: Callable[[int], Progress | None] | None) -> list[FileEntry]:
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
        total = sum(p.stat().st_size for p in paths)
        tick = progress(total) if progress else None
        entries = []
        for p in paths:
            with open(p, "rb") as fh:
                digest, size = sha256_stream(fh, tick)
            entries.append(FileEntry(path=p.relative_to(folder).as_posix(), size=size, sha256=digest))
        return entries

    # ---------------------------------------------------------------- aliases
    def get_alias(self, artifact: ArtifactPath, alias: str) -> AliasFile | None:
        rel = artifact.alias_rel(alias)
        if not self.backend.exists(rel):
            return None
        return parse_alias(self.backend.read_bytes(rel), f"{self.url}/{rel}")

    def aliases(self, artifact: ArtifactPath) -> dict[str, AliasFile]:
        out = {}
        for entry in self.backend.list_dir(f"{artifact.rel}/aliases"):
            if entry.endswith(".json") and not entry.startswith("."):
                found = self.get_alias(artifact, entry.removesuffix(".json"))
                if found:
                    out[found.alias] = found
        return out

    def has_version(self, artifact: ArtifactPath, version: str) -> bool:
        """Whether ``version`` is visible (its manifest exists)."""
        return self.backend.exists(f"{artifact.version_rel(version)}/{MANIFEST_NAME}")

    def alias_lock(self, artifact: ArtifactPath) -> AbstractContextManager[None]:
        """The lock every alias move of ``artifact`` takes, and gc while it retires the
        artifact's versions and LeaseKeeper while it records one: nothing can point at,
        or start loading, a version gc is retiring."""
        return self.backend.lock(f"{artifact.rel}/aliases")

    def set_alias(self, name: str, alias: str, version: str) -> AliasFile:
        validate_name(alias, "alias")
        artifact = self.find(name)
        if self.has_version(artifact, alias):
            raise LoomError(f"alias {alias!r} would shadow version {name}@{alias}; pick another")
        with self.alias_lock(artifact):
            # Checked under the lock: gc retires under it too, so the target still exists.
            if not self.has_version(artifact, version):
                raise NotFoundError(
                    f"{name}@{version} does not exist; versions: {', '.join(self.versions(artifact))}"
                )
            return self._move_alias(artifact, alias, version)

    def _move_alias(self, artifact: ArtifactPath, alias: str, version: str) -> AliasFile:
        """Point ``alias`` at ``version``; the caller holds ``alias_lock(artifact)``."""
        current = self.get_alias(artifact, alias)
        if current is None:
            current = AliasFile(alias=alias, version=version)
            current.history.append(event("set", version, None))
        elif current.version != version:
            current.history.append(event("set", version, current.version))
            current.previous.append(current.version)
            current.version = version
        self.backend.write_atomic(artifact.alias_rel(alias), current.to_json())
        return current

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> AliasFile:
        artifact = self.find(name)
        with self.alias_lock(artifact):
            current = self.get_alias(artifact, alias)
            if current is None:
                raise NotFoundError(f"{name} has no alias {alias!r} to roll back")
            while current.previous:
                target = current.previous.pop()
                if self.has_version(artifact, target):
                    current.history.append(event("rollback", target, current.version))
                    current.version = target
                    self.backend.write_atomic(artifact.alias_rel(alias), current.to_json())
                    return current
            raise LoomError(
                f"{name}@{alias} has no earlier version to roll back to; "
                f"use 'loom store alias set {name} {alias} VERSION'"
            )

    # ---------------------------------------------------------------- defaults
    def default_base(self) -> str | None:
        if not self.backend.exists(DEFAULTS_FILE):
            return None
        value = json.loads(self.backend.read_bytes(DEFAULTS_FILE)).get("base")
        return str(value) if value else None

    def set_default_base(self, name: str) -> None:
        self.find(name)
        self.backend.write_atomic(DEFAULTS_FILE, json.dumps({"base": name}).encode())
