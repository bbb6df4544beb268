"""Folder layout of a store (browsable by hand, like the HF cache).

bases/<name>/versions/<version>/manifest.json + files
bases/<name>/aliases/<alias>.json
adapters/<agent>/<name>/versions/<version>/...
datasets/<name>/versions/<version>/...
.staging/  .trash/  .locks/   (private; cleaned by gc)
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.store.manifest import Kind

KIND_DIRS: dict[Kind, str] = {"base": "bases", "adapter": "adapters", "dataset": "datasets"}


@dataclass(frozen=True)
class ArtifactPath:
    """One named artifact's folder in the store."""

    kind: Kind
    name: str
    agent: str | None = None

    @property
    def rel(self) -> str:
        top = KIND_DIRS[self.kind]
        return f"{top}/{self.agent}/{self.name}" if self.kind == "adapter" else f"{top}/{self.name}"

    def version_rel(self, version: str) -> str:
        return f"{self.rel}/versions/{version}"

    def alias_rel(self, alias: str) -> str:
        return f"{self.rel}/aliases/{alias}.json"

    def describe(self) -> str:
        return f"{self.kind} {self.name}" + (f" (agent {self.agent})" if self.agent else "")
