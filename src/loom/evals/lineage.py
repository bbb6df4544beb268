"""Lineage: tracing a version (or a response) back to the rows it was trained on.

A trace goes from ``name@version`` (or a response id in the server's request
log) to the adapter version, its base, its training summary, its dataset
snapshot and that snapshot's rows; ``nearest_rows`` finds the training rows
lexically nearest a text (BM25) to explain a bad answer. Version names
(``--bump``) are ``loom.train.versions``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loom.data.snapshot import ROW_IDS, describe_rows
from loom.errors import LoomError, NotFoundError, RefError
from loom.store.store import Resolved, Store
from loom.train.versions import (
    KEY_HYPERPARAMETERS,
    LABEL_PATTERN,
    lineage_of,
    parse_semver,
    resolve_snapshot,
    semver_label,
)


# ------------------------------------------------------------------ trace
@dataclass
class SnapshotFacts:
    ref: str
    files: list[dict[str, Any]]  # path, size, sha256 of the data files
    rows: int | None
    content_sha256: str | None


@dataclass
class Trace:
    """A model version's lineage, JSON-ready (``asdict``)."""

    ref: str  # name@version
    kind: str  # adapter or base
    agent: str | None
    label: str | None  # name-v1.2.0 for semver versions
    created_at: str
    base: dict[str, Any]  # ref, fingerprint
    training: dict[str, Any]  # key hyper-parameters, prompt, outcome
    snapshot: SnapshotFacts | None
    problems: list[str] = field(default_factory=list)
    response_id: str | None = None
    model_version: dict[str, Any] | None = None  # as the response recorded it
    query: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # row_id, score, row

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def key_hyperparameters(summary: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters worth showing beside a version (from its training summary)."""
    hp = summary.get("hyperparameters") or {}
    return {k: hp[k] for k in KEY_HYPERPARAMETERS if k in hp}


def _training_facts(summary: dict[str, Any]) -> dict[str, Any]:
    outcome = ("status", "steps", "final_train_loss", "final_eval_loss", "started_at", "ended_at")
    return {
        "hyperparameters": key_hyperparameters(summary),
        "prompt": summary.get("prompting") or {},
        **{k: summary[k] for k in outcome if k in summary},
        **({"version_bump": summary["version_bump"]} if "version_bump" in summary else {}),
    }


def trace(store: Store, ref: str) -> Trace:
    """The lineage of a model version: ``name@version``, ``name`` (current) or ``name-v1.2.0``."""
    resolved = _resolve_model(store, ref)
    m = resolved.manifest
    summary = m.training_summary or {}
    base: dict[str, str | None]
    if m.kind == "adapter" and m.adapter is not None:
        base = {"ref": m.adapter.base_ref, "fingerprint": m.adapter.base_fingerprint}
    else:
        base = {"ref": resolved.ref, "fingerprint": m.base.fingerprint if m.base else None}
    out = Trace(
        ref=resolved.ref,
        kind=m.kind,
        agent=m.agent,
        label=semver_label(m.name, m.version) if parse_semver(m.version) else None,
        created_at=m.created_at.isoformat(),
        base=base,
        training=_training_facts(summary) if summary else {},
        snapshot=None,
    )
    if m.kind == "adapter":
        _, snapshot_ref = lineage_of(m)
        if snapshot_ref is None:
            out.problems.append(f"{resolved.ref} records no dataset snapshot (trained from a hub dataset?)")
        else:
            try:
                out.snapshot = snapshot_facts(store, snapshot_ref)
            except NotFoundError as exc:
                out.problems.append(f"dataset snapshot {snapshot_ref} is no longer in the store ({exc})")
    return out


def snapshot_facts(store: Store, snapshot_ref: str) -> SnapshotFacts:
    resolved = resolve_snapshot(store, snapshot_ref)
    facts = resolved.manifest.dataset or {}
    files = [f.model_dump() for f in resolved.manifest.files if f.path != ROW_IDS]
    return SnapshotFacts(resolved.ref, files, facts.get("rows"), facts.get("content_sha256"))


def _resolve_model(store: Store, ref: str) -> Resolved:
    try:
        resolved = store.resolve(ref)
    except (NotFoundError, RefError):
        label = LABEL_PATTERN.match(ref)
        if label is None or "@" in ref:
            raise
        resolved = store.resolve(f"{label['name']}@{label['version']}")  # name-v1.2.0
    if resolved.manifest.kind == "dataset":
        raise LoomError(
            f"{ref} is a dataset snapshot, not a model version; trace an adapter or base "
            f"(name@version) or a response id"
        )
    return resolved


# ------------------------------------------------------------------ nearest rows (BM25)
def snapshot_rows(store: Store, snapshot_ref: str) -> list[tuple[str, Any]]:
    """Every row of a snapshot as (row id, parsed row), ids as the snapshot recorded them."""
    from loom.store.cache import materialize

    resolved = resolve_snapshot(store, snapshot_ref)
    folder = materialize(store, resolved)
    rows: list[tuple[str, Any]] = []
    for entry in resolved.manifest.files:
        if entry.path == ROW_IDS:
            continue
        path = folder / entry.path
        _facts, ids = describe_rows([path], sha256=entry.sha256)  # the snapshot's own id rule
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows += [(row_id, _parse_row(line)) for row_id, line in zip(ids, lines, strict=True)]
    return rows


def _parse_row(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return line


def row_text(row: Any) -> str:
    """Every string in a row (prompt, response, messages...), the row's ``id`` left out."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        return " ".join(row_text(v) for k, v in row.items() if k != "id")
    if isinstance(row, list):
        return " ".join(row_text(v) for v in row)
    return "" if row is None else str(row)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def nearest_rows(store: Store, snapshot_ref: str, query: str, k: int = 5) -> list[tuple[str, float, Any]]:
    """The ``k`` rows of a snapshot nearest ``query`` by BM25, best first: (row id, score, row).

    Rows sharing no word with the query are left out (their score is 0)."""
    from rank_bm25 import BM25Okapi

    if k < 1:
        raise LoomError(f"--top {k}: must be at least 1")
    words = _tokens(query)
    if not words:
        raise LoomError(f"--query {query!r}: has no words to search for; give some text of the answer")
    rows = snapshot_rows(store, snapshot_ref)
    if not rows:
        return []
    # BM25Okapi divides by the mean document length: a corpus of empty rows would divide by 0
    corpus = [_tokens(row_text(row)) or [""] for _id, row in rows]
    scores = BM25Okapi(corpus).get_scores(words)
    ranked = sorted(range(len(rows)), key=lambda i: -scores[i])
    return [(rows[i][0], float(scores[i]), rows[i][1]) for i in ranked[:k] if scores[i] > 0]


def add_nearest_rows(store: Store, out: Trace, query: str | None, k: int = 5) -> Trace:
    """Fill ``out.rows`` with the rows of its snapshot nearest ``query`` (nothing when it is None)."""
    if query is None:
        return out
    if out.snapshot is None:
        raise LoomError(
            f"--query needs a dataset snapshot, but {out.ref} has none: "
            + ("; ".join(out.problems) or "it is a base model, not a trained adapter")
        )
    out.query = query
    found = nearest_rows(store, out.snapshot.ref, query, k)
    out.rows = [{"row_id": i, "score": round(s, 4), "row": row} for i, s, row in found]
    return out


# ------------------------------------------------------------------ responses
def response_model_version(response_id: str, log_path: str | Path) -> dict[str, Any]:
    """The ``model_version`` the server recorded for ``response_id`` in its request log."""
    from loom.serve.requestlog import RequestLog  # stdlib only: no server import cost

    if not Path(log_path).exists():
        raise NotFoundError(f"--log {log_path}: no request log there; give the server's request log file")
    log = RequestLog.reader(Path(log_path))
    try:
        entry = log.get(response_id)
    except KeyError:
        entry = None
    finally:
        log.close()
    if entry is None:
        raise NotFoundError(
            f"response id {response_id!r} is not in the request log {log_path}; check the id "
            f"(the 'id' field or header of the response) and the log's retention"
        )
    return dict(entry.model_version)


def _is_model(store: Store, target: str) -> bool:
    try:
        _resolve_model(store, target)
    except (NotFoundError, RefError):
        return False
    return True


def trace_target(
    store: Store, target: str, log_path: str | Path | None = None, query: str | None = None, k: int = 5
) -> Trace:
    """What ``loom trace`` does: ``target`` is a model ref, or a response id looked up in ``log_path``."""
    if "@" in target or _is_model(store, target):
        return add_nearest_rows(store, trace(store, target), query, k)
    if log_path is None:
        raise NotFoundError(
            f"{target}: no model version of that name in store {store.url} (see 'loom store ls'); "
            f"to trace a response id, pass --log PATH (the server's request log)"
        )
    model_version = response_model_version(target, log_path)
    answered = model_version.get("adapter") or model_version.get("base")
    if not answered:
        raise LoomError(
            f"response {target!r} was answered by a fallback, not a model (model_version "
            f"{model_version}); there is no training data to trace"
        )
    out = trace(store, str(answered))
    out.response_id, out.model_version = target, model_version
    return add_nearest_rows(store, out, query, k)
