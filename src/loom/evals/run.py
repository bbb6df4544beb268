"""``loom eval``: candidate versions, the promoted version and the base with the same prompt,
side by side on one golden set, through the agents layer exactly as production runs them.

All variants' requests go to one engine at once (rows interleaved across variants, up to
``concurrency`` in flight), so the engine batches the candidate's, the promoted version's and
the base's requests together: one run, one set of engine conditions for every variant, and
each row's latency is that of one request under that load.
"""

from __future__ import annotations

import importlib.metadata
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from loom import __version__
from loom.agents.agent import Agent, BaseFacts, build_agent
from loom.agents.result import AgentResult
from loom.agents.runtime import AgentRuntime
from loom.agents.spec import AgentEntry, FallbackStep
from loom.errors import LoomError
from loom.evals.golden import GoldenRow, GoldenSet
from loom.refs import DEFAULT_ALIAS
from loom.store.aliases import current_user
from loom.store.store import Store

LIBRARIES = ("torch", "transformers", "peft", "trl", "llguidance")


@dataclass
class Variant:
    """One model measured: ``candidate`` (one per ``--candidates`` ref), ``promoted`` (what
    ``current`` points at) or ``base`` (the base alone, with the promoted version's prompt)."""

    name: str
    ref: str  # concrete name@version
    agent: Agent
    steps: list[FallbackStep]


@dataclass
class Outcome:
    """One variant's answer to one golden row (plain data; what metrics and reports read)."""

    output: Any
    raw: str
    error: str | None
    latency_s: float
    citations: list[str] = field(default_factory=list)
    low_confidence: bool = False
    adapter: str | None = None  # the adapter version that answered (None: the base alone)

    @classmethod
    def of(cls, result: AgentResult) -> Outcome:
        return cls(
            output=result.output,
            raw=result.raw,
            error=result.error,
            latency_s=result.latency_s,
            citations=[str(c.get("id")) for c in result.citations],
            low_confidence=result.confidence.get("level") == "low",
            adapter=result.model_version.get("adapter"),
        )


# ------------------------------------------------------------------ which variants
def adapter_name(entry: AgentEntry, agent: str) -> str:
    if entry.adapter is None:
        raise LoomError(
            f"agent {agent!r} has no adapter in the map: there is nothing to evaluate against its "
            "base; give the agent an adapter"
        )
    return entry.adapter.split("@", 1)[0]


def promoted_ref(store: Store, name: str) -> str | None:
    """``name@<version current points at>``, or None before anything was promoted."""
    artifact = store.find(name)
    alias = store.get_alias(artifact, DEFAULT_ALIAS)
    return f"{name}@{alias.version}" if alias else None


def _variant_agent(agent: str, entry: AgentEntry, ref: str, store: Store, base: BaseFacts) -> Agent:
    pinned = entry.model_copy(update={"adapter": ref, "fallback": []}, deep=True)
    return build_agent(agent, pinned, store, base)


def plan_variants(
    agent: str, entry: AgentEntry, store: Store, base: BaseFacts, candidates: list[str]
) -> list[Variant]:
    """Each candidate (resolved to one concrete version), the promoted version unless it is one
    of the candidates, and the base with the promoted (else first candidate's) prompt."""
    name = adapter_name(entry, agent)
    promoted = promoted_ref(store, name)
    refs = [store.resolve(c).ref for c in (candidates or [promoted or name])]
    for ref in refs:
        if ref.split("@", 1)[0] != name:
            raise LoomError(
                f"candidate {ref} is not a version of agent {agent!r}'s adapter {name}; give {name}@<version>"
            )
    variants = []
    for i, ref in enumerate(dict.fromkeys(refs)):
        label = "candidate" if i == 0 else f"candidate-{i + 1}"
        variants.append(Variant(label, ref, _variant_agent(agent, entry, ref, store, base), []))
    if promoted is not None and promoted not in refs:
        variants.append(
            Variant("promoted", promoted, _variant_agent(agent, entry, promoted, store, base), [])
        )
    prompt_from = promoted or refs[0]
    base_agent = _variant_agent(agent, entry, prompt_from, store, base)
    variants.append(Variant("base", base.ref or "base", base_agent, [FallbackStep(base=True)]))
    for v in variants:
        v.steps = v.steps or [FallbackStep(adapter=v.ref)]
    return variants


# ------------------------------------------------------------------ running
def check_rows(agent: Agent, golden: GoldenSet, rows: list[GoldenRow]) -> None:
    """Every golden payload fits the agent's input schema, before any model runs."""
    problems = []
    for row in rows:
        try:
            agent.check_input(row.input, f"golden row {row.id} input")
        except LoomError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LoomError(
            f"golden set {golden.ref} does not fit agent {agent.name!r}: "
            + "; ".join(problems[:5])
            + more
            + "; fix the rows or evaluate another agent"
        )


def run_variants(
    runtime: AgentRuntime,
    variants: list[Variant],
    rows: list[GoldenRow],
    concurrency: int,
    tick: Callable[[], None] | None = None,
) -> dict[str, list[Outcome]]:
    """Every (variant, row) as one agent request, rows interleaved across variants."""
    if concurrency < 1:
        raise LoomError(f"concurrency {concurrency}: give at least 1 request in flight")

    def one(variant: Variant, row: GoldenRow) -> Outcome:
        result = runtime.run_many(variant.agent, [row.input], steps=variant.steps)[0]
        if tick is not None:
            tick()
        return Outcome.of(result)

    jobs = [(v, r) for r in rows for v in variants]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loom-eval") as pool:
        futures = [pool.submit(one, v, r) for v, r in jobs]
        done = [f.result() for f in futures]
    out: dict[str, list[Outcome]] = {v.name: [] for v in variants}
    for (variant, _row), outcome in zip(jobs, done, strict=True):
        out[variant.name].append(outcome)
    return out


# ------------------------------------------------------------------ provenance
def libraries() -> dict[str, str]:
    found = {"loom": __version__}
    for lib in LIBRARIES:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def provenance(golden: GoldenSet, rows: int, base: BaseFacts, engine: dict[str, Any]) -> dict[str, Any]:
    return {
        "golden": {"ref": golden.ref, "sha256": golden.sha256, "rows": rows, "of": len(golden.rows)},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_by": f"{current_user()}@{socket.gethostname()} loom/{__version__}",
        "base": base.ref,
        "engine": engine,
        "libraries": libraries(),
    }
