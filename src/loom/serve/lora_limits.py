"""Which LoRA targets and rank a server holds slots for, and the refusal of an adapter beyond them.

The defaults come from the store: every projection and the largest rank that the stored adapters
for the served base use (read from their manifests; no tensors are loaded), so a default
``loom serve`` takes every adapter trained for its base. ``--lora-targets`` and
``--max-lora-rank`` (vLLM's spelling) override them; an adapter beyond the running limits is
refused before it is submitted, with an error that names the flag to restart with.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loom.engine.runner import ATTN_TARGETS, MLP_TARGETS
from loom.errors import CompatibilityError, LoomError
from loom.serve.config import ServeConfig
from loom.store.manifest import AdapterInfo
from loom.store.store import Store

LORA_TARGETS = ATTN_TARGETS + MLP_TARGETS  # every linear projection the engine gives LoRA slots
# Existing deployments train rank 64: a server started before such an adapter is published
# should take it without a restart, so the default rank never goes below this.
MIN_DEFAULT_RANK = 64
ALL_LINEAR = "all-linear"  # PEFT's spelling for every linear layer but the head

log = logging.getLogger("loom.serve")


@dataclass(frozen=True)
class StoredAdapter:
    """What one stored adapter version needs from the server, from its manifest."""

    ref: str  # name@version
    rank: int
    targets: frozenset[str]  # projection names (q_proj ... down_proj)
    preload: bool = False


@dataclass
class LoraChoice:
    targets: tuple[str, ...]  # in LORA_TARGETS order
    rank: int
    reason: str  # why, for --dry-run and the plan notes
    beyond: list[str]  # stored adapters these limits cannot serve, with what they need

    def notes(self) -> list[str]:
        out = [f"LoRA slots: rank {self.rank} on {', '.join(self.targets)} ({self.reason})"]
        if self.beyond:
            shown = "; ".join(self.beyond[:3]) + (
                f"; and {len(self.beyond) - 3} more" if len(self.beyond) > 3 else ""
            )
            out.append(
                f"{len(self.beyond)} stored adapter(s) for this base need more and will be refused: {shown}"
            )
        return out


def adapter_projections(target_modules: Iterable[str]) -> frozenset[str]:
    """The projections a manifest's ``target_modules`` name: module names or dotted suffixes
    (``q_proj``, ``self_attn.q_proj``), ``all-linear``, or a regex PEFT matched against full
    module names. Anything else (an embedding, the head) is left to the engine's loader."""
    found: set[str] = set()
    for target in target_modules:
        if target == ALL_LINEAR:
            found |= set(LORA_TARGETS)
        elif target.rsplit(".", 1)[-1] in LORA_TARGETS:
            found.add(target.rsplit(".", 1)[-1])
        else:
            found |= {name for name in LORA_TARGETS if _regex_matches(target, name)}
    return frozenset(found)


def _regex_matches(pattern: str, name: str) -> bool:
    part = "self_attn" if name in ATTN_TARGETS else "mlp"
    try:
        return re.fullmatch(pattern, f"model.layers.0.{part}.{name}") is not None
    except re.error:
        return False


def parse_lora_targets(names: Sequence[str]) -> tuple[str, ...]:
    """``--lora-targets`` values (each may be comma-separated) -> projections in canonical order."""
    wanted: set[str] = set()
    for name in (n.strip() for item in names for n in item.split(",")):
        if name == ALL_LINEAR:
            wanted |= set(LORA_TARGETS)
        elif name in LORA_TARGETS:
            wanted.add(name)
        elif name:
            raise LoomError(
                f"--lora-targets: {name!r} is not a projection the engine serves; give a comma-separated "
                f"subset of {','.join(LORA_TARGETS)} (or {ALL_LINEAR})"
            )
    if not wanted:
        raise LoomError(f"--lora-targets is empty; give a comma-separated subset of {','.join(LORA_TARGETS)}")
    return tuple(t for t in LORA_TARGETS if t in wanted)


def stored_adapters(store: Store, fingerprint: str) -> list[StoredAdapter]:
    """Every stored adapter version trained for the base with ``fingerprint`` (manifests only)."""
    out: list[StoredAdapter] = []
    for artifact in store.artifacts():
        if artifact.kind != "adapter":
            continue
        for version in store.versions(artifact):
            try:
                info = store.manifest(artifact, version).adapter
            except LoomError as exc:  # a damaged version is for `loom store verify`, not the plan
                log.warning("serve plan: skipping %s@%s: %s", artifact.name, version, exc)
                continue
            if info is not None and info.base_fingerprint == fingerprint:
                out.append(stored_adapter(f"{artifact.name}@{version}", info))
    return out


def stored_adapter(ref: str, info: AdapterInfo, preload: bool = False) -> StoredAdapter:
    return StoredAdapter(ref, info.r, adapter_projections(info.target_modules), preload)


def choose_lora(cfg: ServeConfig, adapters: Sequence[StoredAdapter]) -> LoraChoice:
    """Targets and rank: the flags when given, else what the stored adapters use (q/k/v/o, what
    training targets by default, always; rank at least MIN_DEFAULT_RANK). Preloads always fit."""
    unique = list({a.ref: a for a in adapters}.values())
    n = len(unique)
    stored = f"{n} stored adapter{'s' if n != 1 else ''} for this base"
    if cfg.lora_targets is None:
        targets = set(ATTN_TARGETS).union(*(a.targets for a in unique))
        why_targets = (
            f"targets: q/k/v/o and every projection the {stored} target" if n else "targets: q/k/v/o"
        )
    else:
        targets = set(parse_lora_targets(cfg.lora_targets))
        why_targets = "targets: --lora-targets"
    top = max((a.rank for a in unique), default=0)
    if cfg.max_lora_rank is None:
        rank = max(MIN_DEFAULT_RANK, top)
        if top >= MIN_DEFAULT_RANK:
            why_rank = f"rank: the largest among the {stored}"
        else:
            why_rank = f"rank: the default {MIN_DEFAULT_RANK}"
            why_rank += f" (the {stored} go up to {top})" if n else ""
    elif cfg.max_lora_rank < 1:
        raise LoomError(f"--max-lora-rank {cfg.max_lora_rank}: give a positive rank (e.g. 64)")
    else:
        rank, why_rank = cfg.max_lora_rank, "rank: --max-lora-rank"
    reason = f"{why_targets}; {why_rank}"
    for a in unique:
        if a.preload and _needs(a, rank, targets):
            targets |= a.targets  # a preload that could never load would fail the start-up
            rank = max(rank, a.rank)
            reason += f"; widened for preload {a.ref}"
    beyond = [f"{a.ref} ({_needs(a, rank, targets)})" for a in unique if _needs(a, rank, targets)]
    return LoraChoice(tuple(t for t in LORA_TARGETS if t in targets), rank, reason, beyond)


def _needs(adapter: StoredAdapter, rank: int, targets: set[str] | frozenset[str]) -> str:
    missing = sorted(adapter.targets - targets, key=LORA_TARGETS.index)
    needs = [f"rank {adapter.rank}"] if adapter.rank > rank else []
    return ", ".join(needs + missing)


def check_served(store: Store | None, key: str, max_rank: int, targets: Sequence[str]) -> None:
    """Refuse adapter ``key`` (``name@version``) when the running limits cannot serve it, naming the
    flag to restart with. Versions are immutable, so each is looked up once per limit set."""
    if store is None or key.startswith("path:"):
        return  # not a store version: the engine's loader checks the tensors themselves
    problem = _limit_problem(store, key, max_rank, tuple(targets))
    if problem is not None:
        raise CompatibilityError(problem)


@functools.lru_cache(maxsize=4096)
def _limit_problem(store: Store, key: str, max_rank: int, targets: tuple[str, ...]) -> str | None:
    info = store.resolve(key).manifest.adapter
    if info is None:
        return None  # not an adapter: the engine's resolver says so
    adapter = stored_adapter(key, info)
    problems = []
    if adapter.rank > max_rank:
        problems.append(
            f"rank {adapter.rank} exceeds the server's --max-lora-rank {max_rank}; restart with "
            f"--max-lora-rank {adapter.rank}"
        )
    missing = [t for t in LORA_TARGETS if t in adapter.targets and t not in targets]
    if missing:
        problems.append(
            f"targets {', '.join(missing)}, which this server does not serve (it serves "
            f"{', '.join(targets)}); restart with --lora-targets including {','.join(missing)}"
        )
    return f"adapter {key}: " + "; ".join(problems) if problems else None
