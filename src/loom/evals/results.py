"""Eval result files beside the immutable version they measured.

``<version folder>/evals/<eval_id>.json``, one sealed JSON file per run (``loom.store.sealed``):
the manifest and the version's files are never touched, a file is written once with
``backend.write_atomic`` (local and object stores alike), and every read checks its seal.
``loom store verify`` checks the same seals.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from loom.errors import LoomError
from loom.refs import validate_name
from loom.store.sealed import body_sha256, render, unseal
from loom.store.store import Resolved, Store
from loom.store.verify import EVALS_DIR

__all__ = ["EVALS_DIR", "EvalRecord", "latest_eval", "list_evals", "new_eval_id", "write_eval"]


@dataclass(frozen=True)
class EvalRecord:
    """One stored eval result: ``ref`` is the exact version (``name@version``) it sits beside."""

    eval_id: str
    ref: str
    rel: str
    sha256: str
    body: dict[str, Any]

    @property
    def golden_sha256(self) -> str | None:
        golden = self.body.get("golden")
        return golden.get("sha256") if isinstance(golden, dict) else None


def new_eval_id(now: datetime | None = None) -> str:
    """``YYYYMMDD-HHMMSS-<8 hex>``: sorts by time, unique across concurrent runs."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(4)}"


def _fix(rel: str) -> str:
    return f"delete {rel} and run 'loom eval' again (eval files are not part of the version)"


def write_eval(store: Store, ref: str, body: dict[str, Any]) -> EvalRecord:
    """Store ``body`` beside the version ``ref`` resolves to; refuses a missing version, a body
    whose ``subject`` is another version, and an ``eval_id`` already stored."""
    resolved = store.resolve(ref)
    eval_id = str(body.get("eval_id") or "")
    if not eval_id:
        raise LoomError(
            f"eval result for {resolved.ref} has no 'eval_id'; set one (loom.evals.results.new_eval_id)"
        )
    validate_name(eval_id, "eval_id")
    subject = body.get("subject")
    if subject is not None and store.resolve(str(subject)).ref != resolved.ref:
        raise LoomError(
            f"eval {eval_id} measured {subject}, not {resolved.ref}; write it beside the version it measured"
        )
    rel = f"{resolved.rel}/{EVALS_DIR}/{eval_id}.json"
    data = render(body)
    # Under the alias lock gc retires versions under: the eval never lands in a folder being removed.
    with store.alias_lock(resolved.artifact):
        if not store.has_version(resolved.artifact, resolved.version):
            raise LoomError(f"{resolved.ref} no longer exists (removed by gc?); evaluate an existing version")
        if store.backend.exists(rel):
            raise LoomError(f"eval {eval_id} of {resolved.ref} is already stored; eval results never change")
        store.backend.write_atomic(rel, data)
    return EvalRecord(eval_id, resolved.ref, rel, body_sha256(body), body)


def read_eval(store: Store, resolved: Resolved, eval_id: str) -> EvalRecord:
    rel = f"{resolved.rel}/{EVALS_DIR}/{eval_id}.json"
    body, digest = unseal(store.backend.read_bytes(rel), f"eval file {store.url}/{rel}", _fix(rel))
    return EvalRecord(eval_id, resolved.ref, rel, digest, body)


def list_evals(store: Store, ref: str | Resolved) -> list[EvalRecord]:
    """Every eval of the version ``ref`` resolves to, oldest first, each verified on read
    (a damaged file is an IntegrityError naming it, never returned)."""
    resolved = ref if isinstance(ref, Resolved) else store.resolve(ref)
    ids = [
        n.removesuffix(".json")
        for n in store.backend.list_dir(f"{resolved.rel}/{EVALS_DIR}")
        if n.endswith(".json") and not n.startswith(".")
    ]
    records = [read_eval(store, resolved, i) for i in ids]
    return sorted(records, key=lambda r: (str(r.body.get("created_at") or ""), r.eval_id))


def latest_eval(store: Store, ref: str | Resolved, golden_sha256: str | None = None) -> EvalRecord | None:
    """The newest eval of that version (against the golden set with ``golden_sha256`` if given)."""
    found = [r for r in list_evals(store, ref) if golden_sha256 is None or r.golden_sha256 == golden_sha256]
    return found[-1] if found else None
