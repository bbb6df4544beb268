"""Retraining: is one due (``check``), and the pipeline snapshot -> train -> eval -> gated
promote as one resumable run (``run``).

A run's state is one small JSON file in the store beside the adapter
(``<adapter>/retrain/<run-id>.json``), rewritten atomically after every step. The new version's
name is chosen when the run is planned and recorded before anything is trained, so a run
killed at any point and started again finds its version already published (publishing is
atomic: a version is whole or absent), its eval already stored, its promotion already logged,
and carries on from the first step not done: no duplicate and no half-made version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from loom.agents.spec import AgentEntry
from loom.data.snapshot import ROW_IDS, describe_rows, snapshot
from loom.errors import LoomError
from loom.store.layout import ArtifactPath
from loom.store.store import Store, auto_version
from loom.train.versions import snapshot_row_ids

STEPS = ("snapshot", "train", "eval", "promote")
Kind = Literal["none", "continue", "full"]


@dataclass
class Thresholds:
    """When a retrain is due (defaults from existing practice: > 10% new rows, quarterly)."""

    new_share: float = 0.10
    max_age_days: float = 92.0
    min_feedback: int = 25
    full_share: float = 0.5  # more new rows than this: retrain from scratch, not continue


@dataclass
class RetrainCheck:
    agent: str
    promoted: str
    snapshot: str | None
    rows_then: int
    rows_now: int
    new_rows: int
    new_share: float
    feedback: int
    age_days: float
    due: bool
    kind: Kind
    reasons: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ check
def promoted_version(store: Store, entry: AgentEntry, agent: str) -> Any:
    from loom.evals.run import adapter_name

    resolved = store.resolve(adapter_name(entry, agent))
    if not (resolved.manifest.training_summary or {}).get("hyperparameters"):
        raise LoomError(
            f"{resolved.ref} has no training summary with hyper-parameters (imported, not trained by "
            "loom train); retrain it once with loom train"
        )
    return resolved


def training_files(store: Store, summary: dict[str, Any]) -> list[Path]:
    """The files the version's data came from, as they are now: the sources its dataset
    snapshot recorded (a retrained version trains on the snapshot's frozen copies, so its own
    inputs are store paths that never change), else its training inputs."""
    snap = (summary.get("data") or {}).get("snapshot")
    if snap:
        try:
            source = store.resolve(snap).manifest.source
        except LoomError:
            source = None
        if source is not None and source.type == "local" and source.uri:
            return [Path(p) for p in source.uri.split(",")]
    return [Path(i["path"]) for i in (summary.get("data") or {}).get("inputs", [])]


def _snapshot_ids(store: Store, ref: str | None) -> set[str]:
    if not ref:
        return set()
    try:
        return set(snapshot_row_ids(store, ref))
    except LoomError:
        return set()  # the snapshot was retired: every row counts as new


def check(
    store: Store,
    agent: str,
    entry: AgentEntry,
    *,
    extra_files: list[Path] | None = None,
    feedback: int = 0,
    thresholds: Thresholds | None = None,
    now: datetime | None = None,
) -> RetrainCheck:
    """Compare the data behind the promoted version with what is there now: the same training
    files read again plus ``extra_files`` (e.g. exported feedback)."""
    t = thresholds or Thresholds()
    resolved = promoted_version(store, entry, agent)
    summary = resolved.manifest.training_summary or {}
    snap = (summary.get("data") or {}).get("snapshot")
    then = _snapshot_ids(store, snap)
    files = [p for p in dict.fromkeys(training_files(store, summary) + (extra_files or [])) if p.is_file()]
    _facts, ids = describe_rows(files) if files else ({}, [])
    new = len(set(ids) - then)
    share = new / max(1, len(ids))  # of the rows a retrain would see, as --bump auto counts them
    age = ((now or datetime.now(timezone.utc)) - resolved.manifest.created_at).total_seconds() / 86400
    reasons = []
    if share > t.new_share:
        reasons.append(f"{new} new rows, {share:.0%} of the {len(ids)} there now (> {t.new_share:.0%})")
    if age > t.max_age_days:
        reasons.append(f"the promoted version is {age:.0f} days old (> {t.max_age_days:.0f})")
    if feedback >= t.min_feedback:
        reasons.append(f"{feedback} corrected answers in feedback (>= {t.min_feedback})")
    kind: Kind = "none"
    if reasons:
        kind = "full" if share > t.full_share or age > t.max_age_days else "continue"
    return RetrainCheck(
        agent,
        resolved.ref,
        snap,
        len(then),
        len(ids),
        new,
        share,
        feedback,
        age,
        bool(reasons),
        kind,
        reasons,
    )


# ------------------------------------------------------------------ the run's state
def _state_rel(store: Store, adapter: str, run_id: str) -> str:
    return f"{store.find(adapter).rel}/retrain/{run_id}.json"


def save_state(store: Store, state: dict[str, Any]) -> None:
    state["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    store.backend.write_atomic(
        _state_rel(store, state["adapter"], state["run_id"]), json.dumps(state, indent=2).encode()
    )


def runs(store: Store, adapter: str) -> list[dict[str, Any]]:
    """Every recorded run of ``adapter``, oldest first."""
    folder = f"{store.find(adapter).rel}/retrain"
    if not store.backend.exists(folder):
        return []
    out = []
    for name in sorted(store.backend.list_dir(folder)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            out.append(json.loads(store.backend.read_bytes(f"{folder}/{name}")))
        except ValueError as exc:
            raise LoomError(
                f"retrain state {folder}/{name} is damaged ({exc}); delete it to forget that run"
            ) from None
    return sorted(out, key=lambda s: s["created_at"])


def abandon(store: Store, adapter: str) -> dict[str, Any] | None:
    """Mark ``adapter``'s unfinished run abandoned (what it published stays); the next
    ``retrain run`` plans a new one."""
    state = unfinished(store, adapter)
    if state is not None:
        state["status"] = "abandoned"
        save_state(store, state)
    return state


@contextlib.contextmanager
def run_lock(store: Store, adapter: str) -> Iterator[None]:
    """One ``retrain run`` of ``adapter`` at a time: a second one (cron firing during a long
    training) is refused at once instead of resuming a run that is still going."""
    folder = store.backend.local_path(".locks")
    if folder is None:
        raise LoomError(f"retrain runs on a local store; {store.url} is remote: cache it locally first")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"retrain__{adapter}.lock"
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoomError(
                f"another 'loom retrain run' of {adapter} is running (it holds {path}); wait for it "
                "to finish or stop it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def unfinished(store: Store, adapter: str) -> dict[str, Any] | None:
    return next((s for s in reversed(runs(store, adapter)) if s["status"] == "running"), None)


def plan(
    store: Store, agent: str, entry: AgentEntry, extra_files: list[Path], golden: str, version: str | None
) -> dict[str, Any]:
    from loom.evals.golden import load_golden

    resolved = promoted_version(store, entry, agent)
    load_golden(store, golden)  # a wrong --golden fails now, not after training
    summary = resolved.manifest.training_summary or {}
    files = [str(p) for p in dict.fromkeys(training_files(store, summary) + extra_files)]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise LoomError(f"retrain {agent}: training files {missing} are gone; restore them or train by hand")
    now = datetime.now(timezone.utc)
    if version is not None and store.has_version(resolved.artifact, version):
        raise LoomError(f"{resolved.artifact.name}@{version} exists already; give another --version")
    state = {
        "run_id": f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
        "agent": agent,
        "adapter": resolved.artifact.name,
        "from": resolved.ref,
        "version": version or _free_version(store, resolved.artifact, now),
        "files": files,
        "extra_rows": sum(_rows_in(p) for p in extra_files),
        "golden": golden,
        "created_at": now.isoformat(timespec="seconds"),
        "status": "running",
        "steps": {},
    }
    save_state(store, state)
    return state


def _free_version(store: Store, artifact: ArtifactPath, now: datetime) -> str:
    """vYYYYMMDD-HHMM, with -2, -3... when runs of the same minute took it (as publish does)."""
    stem = auto_version(now)
    taken = set(store.versions(artifact)) | {s["version"] for s in runs(store, artifact.name)}
    return next(v for v in (stem, *(f"{stem}-{i}" for i in range(2, 1000))) if v not in taken)


def _rows_in(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# ------------------------------------------------------------------ the steps
Step = Callable[[Store, dict[str, Any]], dict[str, Any]]


def step_snapshot(store: Store, state: dict[str, Any]) -> dict[str, Any]:
    manifest, _created = snapshot(store, [Path(f) for f in state["files"]], name=f"{state['adapter']}-data")
    return {"snapshot": f"{manifest.name}@{manifest.version}"}


def snapshot_files(store: Store, ref: str) -> list[Path]:
    """The snapshot's frozen files (training reads these, not the originals, which may change)."""
    resolved = store.resolve(ref)
    folder = store.backend.local_path(resolved.rel)
    if folder is None:
        raise LoomError(f"retrain trains from a local store; {store.url} is remote: cache it locally first")
    return [folder / f.path for f in resolved.manifest.files if f.path != ROW_IDS]


def run_steps(
    store: Store, state: dict[str, Any], steps: dict[str, Step], log: Callable[[str], None]
) -> None:
    """Each step not yet recorded as done, in order; the state is saved after each."""
    for name in STEPS:
        if name in state["steps"]:
            log(f"{name}: done before ({json.dumps(state['steps'][name])})")
            continue
        log(f"{name} ...")
        state["steps"][name] = steps[name](store, state)
        save_state(store, state)
        log(f"{name}: {json.dumps(state['steps'][name])}")
    state["status"] = "done"
    save_state(store, state)
