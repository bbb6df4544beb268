"""Semantic version names for adapters, computed from lineage (``loom train --bump``).

The store version is ``v1.2.0`` and its label ``name-v1.2.0``, as existing deployments use:

- **major**: a new base (the base fingerprint changed);
- **minor**: retrained with more than 10% new rows (rows of the new dataset
  snapshot whose ids are not in the previous version's snapshot);
- **patch**: anything else (hyper-parameters, prompt, a few rows).

The previous version of an adapter is its highest semver-named version; other
names (``vYYYYMMDD-HHMM``, ``v1``) are ignored. The first semver version of an
adapter is ``v1.0.0`` whatever the bump: there is no earlier lineage to bump
from, and ``v0.x`` would read as a pre-release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

from loom.data.snapshot import ROW_IDS
from loom.errors import LoomError, NotFoundError
from loom.store.manifest import Manifest
from loom.store.store import Resolved, Store

BumpKind = Literal["major", "minor", "patch"]
BUMPS = ("major", "minor", "patch", "auto")
FIRST_VERSION = (1, 0, 0)
NEW_ROWS_FOR_MINOR = 0.10  # "retrained with > 10% new rows" in existing practice
KEY_HYPERPARAMETERS = (
    "learning_rate", "epochs", "max_steps", "train_batch_size", "gradient_accumulation", "adapter_r",
    "adapter_alpha", "adapter_dropout", "target_modules", "max_seq_length", "packing", "qlora", "seed",
)  # fmt: skip
_SEMVER = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
LABEL_PATTERN = re.compile(r"^(?P<name>.+)-(?P<version>v\d+\.\d+\.\d+)$")


# ------------------------------------------------------------------ semantic versions
def parse_semver(version: str) -> tuple[int, int, int] | None:
    """``v1.2.0`` -> (1, 2, 0); any other version name -> None."""
    m = _SEMVER.match(version)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def semver_label(name: str, version: str) -> str:
    """The label deployments use: ``name-v1.2.0``."""
    return f"{name}-{version}"


def bumped(version: tuple[int, int, int], kind: BumpKind) -> tuple[int, int, int]:
    major, minor, patch = version
    if kind == "major":
        return (major + 1, 0, 0)
    if kind == "minor":
        return (major, minor + 1, 0)
    return (major, minor, patch + 1)


@dataclass(frozen=True)
class VersionPlan:
    """The version a bump names, and why (recorded in the training summary)."""

    version: str
    kind: BumpKind | None  # None: the first semver version, nothing to bump from
    reason: str
    previous: str | None  # name@version it follows


def previous_version(store: Store, adapter_name: str) -> Resolved | None:
    """The adapter's highest semver-named version, or None when it has none (or no versions)."""
    try:
        artifact = store.find(adapter_name)
    except NotFoundError:
        return None
    if artifact.kind != "adapter":
        raise LoomError(
            f"--adapter-name {adapter_name}: the store already has a {artifact.kind} of that name; "
            f"pick another adapter name"
        )
    named = [(s, v) for v in store.versions(artifact) if (s := parse_semver(v)) is not None]
    if not named:
        return None
    version = max(named)[1]
    return Resolved(artifact, version, store.manifest(artifact, version))


def lineage_of(manifest: Manifest) -> tuple[str | None, str | None]:
    """(base fingerprint, dataset snapshot ref) an adapter version was trained from."""
    summary = manifest.training_summary or {}
    fingerprint = manifest.adapter.base_fingerprint if manifest.adapter else None
    fingerprint = fingerprint or (summary.get("base") or {}).get("fingerprint")
    return fingerprint, (summary.get("data") or {}).get("snapshot")


def snapshot_row_ids(store: Store, snapshot_ref: str) -> list[str]:
    """The row ids a dataset snapshot recorded (``row_ids.txt``), in order."""
    resolved = resolve_snapshot(store, snapshot_ref)
    rel = f"{resolved.rel}/{ROW_IDS}"
    if not store.backend.exists(rel):
        raise LoomError(f"dataset snapshot {resolved.ref} has no {ROW_IDS}; re-snapshot its files")
    return [line for line in store.backend.read_bytes(rel).decode().splitlines() if line]


def new_row_share(store: Store, previous_snapshot: str | None, snapshot_ref: str) -> float:
    """Share of ``snapshot_ref``'s rows whose ids are not in ``previous_snapshot`` (None: all new)."""
    ids = snapshot_row_ids(store, snapshot_ref)
    if not ids:
        return 0.0
    old = set(snapshot_row_ids(store, previous_snapshot)) if previous_snapshot else set()
    return sum(1 for i in ids if i not in old) / len(ids)


def bump_kind(
    store: Store, previous: Manifest, base_fingerprint: str | None, snapshot_ref: str | None
) -> tuple[BumpKind, str]:
    """What ``--bump auto`` picks after ``previous``, and why."""
    old_fingerprint, old_snapshot = lineage_of(previous)
    if base_fingerprint != old_fingerprint:
        return "major", f"base fingerprint changed ({_short(old_fingerprint)} -> {_short(base_fingerprint)})"
    if snapshot_ref is None:
        return "patch", "no dataset snapshot to compare (trained from --dataset-name?); same base"
    if snapshot_ref == old_snapshot:
        return "patch", f"same base and same dataset snapshot {snapshot_ref}"
    share = new_row_share(store, old_snapshot, snapshot_ref)
    where = f"not in {old_snapshot}" if old_snapshot else "the previous version records no snapshot"
    if share > NEW_ROWS_FOR_MINOR:
        return "minor", f"{share:.1%} of {snapshot_ref}'s rows are new ({where}), over 10%"
    return "patch", f"{share:.1%} of {snapshot_ref}'s rows are new ({where}), 10% or less"


def plan_version(
    store: Store, adapter_name: str, bump: str, base_fingerprint: str | None, snapshot_ref: str | None
) -> VersionPlan:
    """The next ``vMAJOR.MINOR.PATCH`` of ``adapter_name`` for ``bump`` (major, minor, patch, auto)."""
    if bump not in BUMPS:
        raise LoomError(f"--bump {bump}: unknown; use one of {', '.join(BUMPS)}")
    prev = previous_version(store, adapter_name)
    if prev is None:
        first = "v{}.{}.{}".format(*FIRST_VERSION)
        return VersionPlan(first, None, f"first semver version of {adapter_name}", None)
    if bump == "auto":
        kind, reason = bump_kind(store, prev.manifest, base_fingerprint, snapshot_ref)
    else:
        kind, reason = cast(BumpKind, bump), f"--bump {bump}"
    old = parse_semver(prev.version)
    assert old is not None  # previous_version only returns semver names
    return VersionPlan("v{}.{}.{}".format(*bumped(old, kind)), kind, reason, prev.ref)


def next_version(
    store: Store, adapter_name: str, bump: str, base_fingerprint: str | None, snapshot_ref: str | None
) -> str:
    """The version name ``loom train --bump`` publishes under, e.g. ``v1.3.0``."""
    return plan_version(store, adapter_name, bump, base_fingerprint, snapshot_ref).version


def _short(fingerprint: str | None) -> str:
    return fingerprint[:12] if fingerprint else "none"


def resolve_snapshot(store: Store, snapshot_ref: str) -> Resolved:
    resolved = store.resolve(snapshot_ref)
    if resolved.manifest.kind != "dataset":
        raise LoomError(f"{snapshot_ref} is a {resolved.manifest.kind}, not a dataset snapshot")
    return resolved
