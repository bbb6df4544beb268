"""``gc``: remove what no one can use any more.

Always: staging areas whose publishing process is gone (crashed or killed)
and interrupted deletes. With ``keep``: for each artifact, versions beyond
the newest ``keep`` that no alias points to (aliases are never broken).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.store.store import Store

DEFAULT_STALE_AFTER_S = 24 * 3600


@dataclass
class GcReport:
    leftovers: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    dry_run: bool = False


def collect(
    store: Store,
    *,
    keep: int | None = None,
    dry_run: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> GcReport:
    report = GcReport(dry_run=dry_run)
    for item in store.backend.leftovers(stale_after_s):
        report.leftovers.append(f"{item.location} ({item.reason})")
        report.freed_bytes += item.size
        if not dry_run:
            store.backend.remove_leftover(item)
    if keep is None:
        return report
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}); aliases keep their targets")
    artifacts = store.artifacts()
    # Bases that stored adapters were trained on stay, or those adapters break.
    used_bases: set[str] = set()
    for a in artifacts:
        if a.kind == "adapter":
            for v in store.versions(a):
                info = store.manifest(a, v).adapter
                if info:
                    used_bases.add(info.base_ref)
    for artifact in artifacts:
        pinned = {a.version for a in store.aliases(artifact).values()}
        pinned |= {r.split("@", 1)[1] for r in used_bases if r.startswith(f"{artifact.name}@")}
        versions = store.versions(artifact)
        for version in versions[: max(0, len(versions) - keep)]:
            if version in pinned:
                continue
            manifest = store.manifest(artifact, version)
            report.versions.append(f"{artifact.name}@{version}")
            report.freed_bytes += manifest.total_bytes
            if not dry_run:
                store.backend.retire(artifact.version_rel(version))
    return report
