"""Gated promotion, rollback, and a version's status, with an append-only promotion log.

The log is one small sealed JSON file per event under the artifact's folder,
``<artifact>/promotions/<UTC stamp>-<random>.json``, each written once with
``backend.write_atomic``: appending never rewrites an earlier entry, and works the same on
object stores (no read-modify-write of a shared file). A version's status (candidate,
deployed, archived, failed) is derived from the aliases and this log, never stored.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from loom.errors import IntegrityError, LoomError
from loom.evals.gates import GateResult, check_gates, passed, use_cases
from loom.evals.results import EvalRecord, latest_eval, list_evals
from loom.refs import DEFAULT_ALIAS, parse_ref
from loom.store.aliases import AliasFile, current_user
from loom.store.layout import ArtifactPath
from loom.store.sealed import render, unseal
from loom.store.store import Resolved, Store

if TYPE_CHECKING:  # loom.agents imports the engine (torch): only gates_for needs it at run time
    from loom.agents.spec import Gates

PROMOTIONS_DIR = "promotions"
Action = Literal["promote", "force-promote", "refused", "rollback"]
Status = Literal["candidate", "deployed", "archived", "failed"]


class PromotionEvent(BaseModel):
    """One entry of the promotion log."""

    model_config = ConfigDict(extra="forbid")

    action: Action
    ref: str  # the version acted on, name@version
    alias: str = DEFAULT_ALIAS
    from_version: str | None  # where the alias pointed before
    to_version: str | None  # where it points after (refused: the version that was refused)
    who: str
    when: datetime
    eval_id: str | None = None
    golden: dict[str, Any] | None = None  # {"ref": ..., "sha256": ...}
    metrics: dict[str, Any] | None = None  # the candidate's headline metrics
    gates: list[dict[str, Any]] = []
    reason: str | None = None


@dataclass
class PromotionDecision:
    event: PromotionEvent
    gates: list[GateResult]

    @property
    def promoted(self) -> bool:
        return self.event.action in ("promote", "force-promote")


class PromotionRefused(LoomError):
    """The gates failed; the refusal is logged and ``decision`` says why."""

    def __init__(self, message: str, decision: PromotionDecision) -> None:
        super().__init__(message)
        self.decision = decision


# ---------------------------------------------------------------- the log
def _log_rel(artifact: ArtifactPath) -> str:
    return f"{artifact.rel}/{PROMOTIONS_DIR}"


def append_event(store: Store, artifact: ArtifactPath, event: PromotionEvent) -> str:
    """Write ``event`` as a new log file (names sort by time; never overwrites); its rel path."""
    stamp = event.when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    rel = f"{_log_rel(artifact)}/{stamp}-{secrets.token_hex(4)}.json"
    store.backend.write_atomic(rel, render(event.model_dump(mode="json")))
    return rel


def read_log(store: Store, artifact: ArtifactPath) -> list[PromotionEvent]:
    """Every logged event of ``artifact``, oldest first, each checked against its seal."""
    events = []
    for name in store.backend.list_dir(_log_rel(artifact)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        rel = f"{_log_rel(artifact)}/{name}"
        fix = "restore it from a backup, or move it aside (statuses derived from the log may then be wrong)"
        body, _ = unseal(store.backend.read_bytes(rel), f"promotion log entry {store.url}/{rel}", fix)
        try:
            events.append(PromotionEvent.model_validate(body))
        except ValidationError as exc:
            raise IntegrityError(
                f"promotion log entry {store.url}/{rel} does not validate ({exc}); {fix}"
            ) from None
    return events


def _event(
    action: Action, ref: str, alias: str, before: str | None, after: str | None, **kw: Any
) -> PromotionEvent:
    who = f"{current_user()}@{socket.gethostname()}"
    now = datetime.now(timezone.utc)
    return PromotionEvent(
        action=action, ref=ref, alias=alias, from_version=before, to_version=after, who=who, when=now, **kw
    )


# ---------------------------------------------------------------- gates from the agent map
def gates_for(name: str, map_path: Path | str | None = None) -> tuple[Gates, str]:
    """The gates of the agent-map entry whose adapter is ``name``, and where they came from;
    the default gates when there is no map (none given, $LOOM_AGENT_MAP unset, no
    ./AGENT_MODEL_MAP.json) or no entry for it."""
    from loom.agents.loader import find_map
    from loom.agents.spec import MAP_FILE, Gates, load_map_file

    if map_path is None and not os.environ.get("LOOM_AGENT_MAP") and not Path(MAP_FILE).is_file():
        return Gates(), "default gates (no agent map: pass --agents or set LOOM_AGENT_MAP)"
    where = find_map(map_path)
    doc = load_map_file(where)
    for agent, entry in doc.agents.items():
        if entry.adapter is not None and parse_ref(entry.adapter).name == name:
            return entry.gates, f"gates of agent {agent!r} in {where}"
    return Gates(), f"default gates (no agent in {where} uses adapter {name!r})"


# ---------------------------------------------------------------- promote / rollback
def promote(
    store: Store,
    ref: str,
    *,
    golden: str | None,
    gates: Gates,
    force: bool = False,
    reason: str | None = None,
    alias: str = DEFAULT_ALIAS,
) -> PromotionDecision:
    """Move ``alias`` to the version ``ref`` names when its latest eval against ``golden``
    (any golden set when None) passes ``gates``; ``force`` (with a ``reason``) overrides.
    Every decision is logged; a refusal raises PromotionRefused listing the failed gates."""
    if force and not (reason and reason.strip()):
        raise LoomError(
            "--force needs --reason TEXT: say why this version goes live despite its gates "
            "(the reason is kept in the promotion log)"
        )
    parsed = parse_ref(ref)
    if parsed.kind != "store" or parsed.selector is None:
        raise LoomError(
            f"promote {ref!r}: name the version to promote as NAME@VERSION "
            f"(see 'loom versions {parsed.name}')"
        )
    resolved = store.resolve(parsed)
    record = _eval_for(store, resolved, golden)
    before = store.get_alias(resolved.artifact, alias)
    results = check_gates(record.body, gates)
    stale = _stale_comparison(record, resolved, before.version if before else None, gates)
    if stale is not None:
        results = [r for r in results if r.name != "no_regression"] + [stale]
    ok = passed(results)
    facts: dict[str, Any] = dict(
        eval_id=record.eval_id,
        golden=_golden_of(record),
        metrics=headline(record.body),
        gates=[asdict(r) for r in results],
        reason=reason,
    )
    from_version = before.version if before else None
    if before is not None and before.version == resolved.version and before.history:
        # an earlier attempt moved the alias and was cut off before it logged: the log says
        # where the alias came from, as the alias file's own history does
        last = before.history[-1]
        from_version = last.previous if last.version == resolved.version else from_version
    if not ok and not force:
        event = _event("refused", resolved.ref, alias, from_version, resolved.version, **facts)
        append_event(store, resolved.artifact, event)
        decision = PromotionDecision(event, results)
        raise PromotionRefused(_refusal(resolved, record, results, alias), decision)
    # The alias moves first, then the log entry: a crash between leaves the move in the
    # alias file's own history, and promoting again logs it; the other order could log
    # a promotion that never happened.
    store.set_alias(resolved.artifact.name, alias, resolved.version)
    event = _event(
        "promote" if ok else "force-promote", resolved.ref, alias, from_version, resolved.version, **facts
    )
    append_event(store, resolved.artifact, event)
    return PromotionDecision(event, results)


def rollback(store: Store, name: str, alias: str = DEFAULT_ALIAS) -> PromotionEvent:
    """``store.rollback`` (``alias`` back to its previous target), logged like a promotion."""
    artifact = store.find(name)
    before = store.get_alias(artifact, alias)
    moved: AliasFile = store.rollback(name, alias)
    event = _event(
        "rollback",
        f"{artifact.name}@{moved.version}",
        alias,
        before.version if before else None,
        moved.version,
    )
    append_event(store, artifact, event)
    return event


def _full(record: EvalRecord) -> bool:
    """Whether the eval ran the whole golden set (a ``--limit`` smoke run proves nothing)."""
    golden = record.body.get("golden") or {}
    return golden.get("of") is None or golden.get("rows") == golden.get("of")


def _eval_for(store: Store, resolved: Resolved, golden: str | None) -> EvalRecord:
    sha, against = None, ""
    if golden is not None:
        g = store.resolve(golden)
        against = f" against golden set {g.ref}"
        sha = (g.manifest.dataset or {}).get("content_sha256")
        if not sha:
            raise LoomError(
                f"--golden {golden}: {g.ref} is not a dataset (no content hash); give a golden set's ref"
            )
    records = list_evals(store, resolved)
    matching = [r for r in records if sha is None or r.golden_sha256 == sha]
    full = [r for r in matching if _full(r)]
    if full:
        return full[-1]
    if matching:
        g0 = matching[-1].body.get("golden") or {}
        raise LoomError(
            f"{resolved.ref} has only --limit evals{against} ({g0.get('rows')} of {g0.get('of')} rows); "
            f"run 'loom eval AGENT --candidates {resolved.ref}' on the whole golden set, then promote it"
        )
    others = sorted({str((r.body.get("golden") or {}).get("ref")) for r in records})
    seen = f" (it has evals against {', '.join(others)} only)" if others else ""
    raise LoomError(
        f"{resolved.ref} has no eval{against or ' results'}{seen}; run 'loom eval AGENT "
        f"--candidates {resolved.ref}' first, then promote it"
    )


def _stale_comparison(
    record: EvalRecord, resolved: Resolved, live: str | None, gates: Gates
) -> GateResult | None:
    """A failed no_regression gate when the eval compared the candidate with another version
    than the one live now (promotions since then): the comparison no longer says anything."""
    if not gates.no_regression or live is None or live == resolved.version:
        return None
    now = f"{resolved.artifact.name}@{live}"
    against = (record.body.get("comparison") or {}).get("against")
    if against == now:
        return None
    return GateResult(
        "no_regression",
        gates.alpha,
        None,
        False,
        f"the eval compared {resolved.ref} with {against or 'nothing'}, but {now} is live now; run "
        f"'loom eval AGENT --candidates {resolved.ref}' again",
    )


def _golden_of(record: EvalRecord) -> dict[str, Any] | None:
    golden = record.body.get("golden")
    return {"ref": golden.get("ref"), "sha256": golden.get("sha256")} if isinstance(golden, dict) else None


def headline(body: dict[str, Any]) -> dict[str, Any]:
    """The candidate's overall metrics (per-category breakdowns stay in the eval file)."""
    metrics = ((body.get("variants") or {}).get("candidate") or {}).get("metrics") or {}
    return {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}


def _refusal(resolved: Resolved, record: EvalRecord, results: list[GateResult], alias: str) -> str:
    failed = "; ".join(f"{r.name}: {r.detail}" for r in results if not r.passed)
    return (
        f"{resolved.ref} not promoted: gates failed on eval {record.eval_id} ({failed}); "
        f"{alias} is unchanged. Improve the candidate and evaluate it again, or override with "
        f"'loom promote {resolved.ref} --force --reason TEXT' (recorded in the promotion log)"
    )


# ---------------------------------------------------------------- status
def status_of(store: Store, artifact: ArtifactPath, version: str) -> Status:
    return _status(version, store.get_alias(artifact, DEFAULT_ALIAS), read_log(store, artifact))


def _status(version: str, current: AliasFile | None, events: list[PromotionEvent]) -> Status:
    """deployed: ``current`` points at it; failed: its latest promotion was refused; archived:
    it was live once (log or alias history); else candidate."""
    if current is not None and current.version == version:
        return "deployed"
    log = [e for e in events if e.alias == DEFAULT_ALIAS]
    mine = [e for e in log if e.to_version == version]
    history = current.history if current is not None else []
    # failed unless the alias was pointed at it by hand after the refusal (not through promote)
    if (
        mine
        and mine[-1].action == "refused"
        and not any(h.version == version and h.at > mine[-1].when for h in history)
    ):
        return "failed"
    was_live = (
        any(e.action != "refused" for e in mine)
        or any(e.from_version == version for e in log if e.action != "refused")
        or any(version in (h.version, h.previous) for h in history)
    )
    return "archived" if was_live else "candidate"


# ---------------------------------------------------------------- versions table
def versions_table(store: Store, name: str, gates: Gates | None = None) -> list[dict[str, Any]]:
    """One row per version, oldest first: lineage, key hyper-parameters, latest eval, status and
    recommended use cases (the categories its latest eval passes ``gates`` in; before any eval,
    the base's size-based list)."""
    artifact = store.find(name)
    aliases = store.aliases(artifact)
    events = read_log(store, artifact)
    rows = []
    for version in store.versions(artifact):
        resolved = Resolved(artifact, version, store.manifest(artifact, version))
        row = {"version": version, **_lineage(resolved), "eval": _eval_summary(store, resolved)}
        row["recommended_use_cases"] = recommended_use_cases(store, resolved, gates)
        row["status"] = _status(version, aliases.get(DEFAULT_ALIAS), events)
        row["aliases"] = sorted(a for a, f in aliases.items() if f.version == version)
        rows.append(row)
    return rows


def recommended_use_cases(store: Store, resolved: Resolved, gates: Gates | None = None) -> list[str]:
    """Where the version's latest eval says it is good (categories passing ``gates``); with no
    eval yet, the size-based heuristic of its base's manifest."""
    from loom.agents.spec import Gates as DefaultGates

    try:
        record = latest_eval(store, resolved)
    except IntegrityError:
        record = None
    if record is not None:
        return use_cases(record.body, gates or DefaultGates())
    base_ref = resolved.manifest.adapter.base_ref if resolved.manifest.adapter else None
    if base_ref is None:
        return list(resolved.manifest.base.recommended_use_cases) if resolved.manifest.base else []
    try:
        info = store.resolve(base_ref).manifest.base
    except LoomError:
        return []
    return list(info.recommended_use_cases) if info else []


def _lineage(resolved: Resolved) -> dict[str, Any]:
    m = resolved.manifest
    summary = m.training_summary or {}
    hp = summary.get("hyperparameters") or {}
    data = summary.get("data") or {}
    steps = summary.get("steps") or (hp.get("max_steps") if (hp.get("max_steps") or -1) > 0 else None)
    return {
        "created": m.created_at.isoformat(),
        "base": m.adapter.base_ref if m.adapter else (summary.get("base") or {}).get("ref"),
        "dataset": data.get("snapshot"),
        "rows": data.get("rows_used"),
        "r": m.adapter.r if m.adapter else hp.get("adapter_r"),
        "alpha": m.adapter.alpha if m.adapter else hp.get("adapter_alpha"),
        "lr": hp.get("learning_rate"),
        "epochs": hp.get("epochs"),
        "steps": steps,
    }


def _eval_summary(store: Store, resolved: Resolved) -> dict[str, Any] | None:
    try:
        record = latest_eval(store, resolved)
    except IntegrityError as exc:  # one damaged file must not hide the whole table
        return {"error": str(exc)}
    if record is None:
        return None
    return {"eval_id": record.eval_id, "golden": _golden_of(record), "metrics": headline(record.body)}
