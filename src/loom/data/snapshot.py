"""Dataset snapshots: data files frozen into the store with their facts.

A snapshot records a content hash (over file names and bytes), the row ids,
the row count and per-source and per-label breakdowns, so a training run can
name exactly what it learned from and two runs on the same bytes share one
snapshot.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from loom.errors import LoomError
from loom.store.manifest import Manifest, Source
from loom.store.store import Store

ROW_IDS = "row_ids.txt"


def content_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def describe_rows(
    paths: list[Path], label_field: str = "label", sha256: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Facts and row ids (``id`` field, else ``file:line``) of JSON/JSONL files."""
    per_source: Counter[str] = Counter()
    per_label: Counter[str] = Counter()
    ids: list[str] = []
    for p in paths:
        lines = p.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            per_source[p.name] += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            ids.append(str(row.get("id", f"{p.name}:{n}")) if isinstance(row, dict) else f"{p.name}:{n}")
            if isinstance(row, dict) and row.get(label_field) is not None:
                per_label[str(row[label_field])] += 1
    facts = {
        "content_sha256": sha256 or content_hash(paths),
        "rows": sum(per_source.values()),
        "rows_per_source": dict(per_source),
        "label_field": label_field if per_label else None,
        "rows_per_label": dict(sorted(per_label.items())),
        "unique_ids": len(set(ids)),
    }
    return facts, ids


def find_snapshot(store: Store, content_sha256: str) -> Manifest | None:
    """An existing snapshot with exactly these bytes, if any."""
    for summary in store.summaries("dataset"):
        for v in summary.versions:
            m = store.manifest(summary.artifact, v)
            if m.dataset and m.dataset.get("content_sha256") == content_sha256:
                return m
    return None


def snapshot(
    store: Store,
    paths: list[Path],
    *,
    name: str,
    label_field: str = "label",
    reuse: bool = True,
    **kw: Any,
) -> tuple[Manifest, bool]:
    """Publish ``paths`` as a snapshot (or return an identical existing one). -> (manifest, created)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LoomError(f"data files not found: {missing}")
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise LoomError(f"snapshot files must have distinct names, got {names}; rename or copy them")
    digest = content_hash(paths)
    if reuse:
        existing = find_snapshot(store, digest)
        if existing is not None:
            return existing, False
    facts, ids = describe_rows(paths, label_field, digest)

    def fill(dest: Path) -> None:
        for p in paths:
            shutil.copy2(p, dest / p.name)
        (dest / ROW_IDS).write_text("\n".join(ids) + "\n")

    source = Source(type="local", uri=",".join(str(p.resolve()) for p in paths))
    kw.setdefault("alias", "current")
    m = store.publish("dataset", name, fill=fill, describe=lambda _d: {"dataset": facts}, source=source, **kw)
    return m, True
