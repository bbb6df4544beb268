"""``gc``: remove what no one can use any more.

Always: staging areas whose publishing process is gone (crashed or killed),
interrupted deletes, and lease files whose process is gone or stopped
refreshing them. With ``keep``: for each artifact, the versions beyond the
newest ``keep`` that nothing needs. A version is needed, and kept with its
reasons in the report, when an alias points at it, when it is in an alias's
rollback history (so ``rollback`` keeps working), when a live process holds a
lease on it (it is being served or loaded), or when it is the base of a
stored adapter.

Each artifact is decided and retired under its alias lock, the lock alias
moves and ``LeaseKeeper.hold`` take: no alias can be pointed at, and no lease
taken on, a version while gc retires it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.store.layout import ArtifactPath
from loom.store.leases import DEFAULT_TTL_S, active_leases, stale_leases
from loom.store.store import Store

DEFAULT_STALE_AFTER_S = 24 * 3600


@dataclass
class GcReport:
    leftovers: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    # Versions beyond --keep that stay, each with why: "adapter qv4@v1 kept: in alias current's history".
    kept: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    dry_run: bool = False


def collect(
    store: Store,
    *,
    keep: int | None = None,
    dry_run: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    lease_ttl_s: float = DEFAULT_TTL_S,
) -> GcReport:
    if keep is not None and keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}); aliases keep their targets")
    report = GcReport(dry_run=dry_run)
    for item in store.backend.leftovers(stale_after_s):
        report.leftovers.append(f"{item.location} ({item.reason})")
        report.freed_bytes += item.size
        if not dry_run:
            store.backend.remove_leftover(item)
    for rel, why in stale_leases(store, lease_ttl_s):
        report.leases.append(f"{rel} ({why})")
        if not dry_run:
            store.backend.remove(rel)
    if keep is None:
        return report
    artifacts = store.artifacts()
    bases = _bases_in_use(store, artifacts)
    for artifact in artifacts:
        _collect_versions(store, artifact, keep, bases, lease_ttl_s, report)
    return report


def _bases_in_use(store: Store, artifacts: list[ArtifactPath]) -> dict[str, list[str]]:
    """Each base ref a stored adapter was trained on, with those adapters: they break without it."""
    used: dict[str, list[str]] = {}
    for a in artifacts:
        if a.kind == "adapter":
            for v in store.versions(a):
                info = store.manifest(a, v).adapter
                if info:
                    used.setdefault(info.base_ref, []).append(f"{a.name}@{v}")
    return used


def _collect_versions(
    store: Store,
    artifact: ArtifactPath,
    keep: int,
    bases: dict[str, list[str]],
    lease_ttl_s: float,
    report: GcReport,
) -> None:
    with store.alias_lock(artifact):
        versions = store.versions(artifact)
        old = versions[: max(0, len(versions) - keep)]
        if not old:
            return
        # Leases are read under the lock: a LeaseKeeper.hold that returned before we
        # took it is in them, and one after finds the version gone and says so.
        why = _reasons_to_keep(store, artifact, bases, active_leases(store, lease_ttl_s))
        for version in old:
            ref = f"{artifact.name}@{version}"
            if version in why:
                report.kept.append(f"{artifact.kind} {ref} kept: {'; '.join(why[version])}")
                continue
            report.versions.append(ref)
            report.freed_bytes += store.manifest(artifact, version).total_bytes
            if not report.dry_run:
                store.backend.retire(artifact.version_rel(version))


def _reasons_to_keep(
    store: Store, artifact: ArtifactPath, bases: dict[str, list[str]], leases: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Version -> why it must stay, for the versions of ``artifact`` something needs."""
    why: dict[str, list[str]] = {}

    def add(version: str, reason: str) -> None:
        reasons = why.setdefault(version, [])
        if reason not in reasons:
            reasons.append(reason)

    for alias in store.aliases(artifact).values():
        add(alias.version, f"alias {alias.alias} points at it")
        for earlier in alias.previous:
            add(earlier, f"in alias {alias.alias}'s history")
    prefix = f"{artifact.name}@"  # names hold no '@', so this matches this artifact only
    for ref, adapters in bases.items():
        if ref.startswith(prefix):
            more = f" and {len(adapters) - 1} more" if len(adapters) > 1 else ""
            add(ref[len(prefix) :], f"base of adapter {adapters[0]}{more}")
    for ref, holders in leases.items():
        if ref.startswith(prefix):
            add(ref[len(prefix) :], "leased by " + ", ".join(holders))
    return why
