"""The evaluation verb: ``evaluate(agent, golden=..., candidates=...)`` runs the variants side
by side (``loom.evals.run``), grades them (``loom.evals.metrics``) and writes one result file
beside each candidate version (``loom.evals.results``). ``loom eval`` is a thin shell over it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom.agents.loader import base_facts, find_map, runtime_for
from loom.agents.spec import AgentEntry, AgentMapFile, load_map_file
from loom.engine import Engine
from loom.errors import LoomError
from loom.evals.golden import GoldenRow, load_golden
from loom.evals.metrics import Graded, compare, grade, row_record, summarize
from loom.evals.results import new_eval_id, write_eval
from loom.evals.run import (
    Outcome,
    Variant,
    adapter_name,
    check_rows,
    plan_variants,
    promoted_ref,
    provenance,
    run_variants,
)
from loom.store.store import Store


@dataclass
class EvalRun:
    """What one ``loom eval`` measured: one result body per candidate, and where each is stored."""

    agent: str
    variants: dict[str, str]  # variant name -> concrete ref
    bodies: list[dict[str, Any]]
    saved: list[str]  # store paths of the result files (empty with save=False)


def agent_entry(doc: AgentMapFile, where: Path, agent: str) -> AgentEntry:
    entry = doc.agents.get(agent)
    if entry is None:
        raise LoomError(f"agent {agent!r} is not in {where}; agents there: {', '.join(sorted(doc.agents))}")
    return entry


def evaluate(
    agent: str,
    *,
    engine: Engine,
    store: Store,
    golden: str | None = None,
    candidates: list[str] | None = None,
    map_path: Path | str | None = None,
    limit: int | None = None,
    scorer: str | None = None,
    concurrency: int = 16,
    save: bool = True,
    tick: Callable[[], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> EvalRun:
    where = find_map(map_path)
    doc = load_map_file(where)
    entry = agent_entry(doc, where, agent)
    gold = load_golden(store, golden or entry.eval.golden or f"{agent}-golden")
    if limit is not None and limit < 1:
        raise LoomError(f"--limit {limit}: give a positive number of rows")
    rows = gold.rows[:limit] if limit else gold.rows
    base = base_facts(engine, store)
    variants = plan_variants(agent, entry, store, base, candidates or [])
    check_rows(variants[0].agent, gold, rows)
    if total is not None:
        total(len(rows) * len(variants))
    outcomes = run_variants(runtime_for(doc, where, engine), variants, rows, concurrency, tick)
    chosen = scorer or entry.eval.scorer
    hedges = list(entry.confidence.hedges)
    grades = {
        v.name: [grade(r, o, chosen, hedges) for r, o in zip(rows, outcomes[v.name], strict=True)]
        for v in variants
    }
    settings = {
        "max_batch_size": engine.config.max_batch_size,
        "max_seq_len": engine.config.max_seq_len,
        "device": base.device,
        "variant": base.variant,
        "concurrency": concurrency,
        "scorer": chosen,
        "fallback": "off: each variant is measured alone",
        "generation": entry.generation.model_dump(),
    }
    common = provenance(gold, len(rows), base, settings)
    live = promoted_ref(store, adapter_name(entry, agent))
    bodies = [
        _body(agent, v, variants, rows, outcomes, grades, common, entry.gates.alpha, live)
        for v in variants
        if v.name.startswith("candidate")
    ]
    saved = [write_eval(store, b["subject"], b).rel for b in bodies] if save else []
    return EvalRun(agent, {v.name: v.ref for v in variants}, bodies, saved)


def _body(
    agent: str,
    subject: Variant,
    variants: list[Variant],
    rows: list[GoldenRow],
    outcomes: dict[str, list[Outcome]],
    grades: dict[str, list[Graded]],
    common: dict[str, Any],
    alpha: float,
    live: str | None,
) -> dict[str, Any]:
    """The result file of ``subject``: it as ``candidate``, beside the promoted version (``live``,
    whether it ran as ``promoted`` or as another candidate) and the base."""
    promoted = next((v.name for v in variants if v.ref == live and v is not subject), None)
    shown = {"candidate": subject.name, "promoted": promoted, "base": "base"}
    present = {label: name for label, name in shown.items() if name is not None and name in grades}
    body: dict[str, Any] = {
        "eval_id": new_eval_id(),
        "agent": agent,
        "subject": subject.ref,
        **common,
        "variants": {
            label: {"ref": _ref(variants, name), "metrics": summarize(grades[name])}
            for label, name in present.items()
        },
    }
    if promoted is not None:
        body["comparison"] = {
            "against": _ref(variants, promoted),
            "alpha": alpha,
            "metrics": compare(grades[promoted], grades[subject.name], alpha),
        }
    body["rows"] = [
        row_record(
            row,
            {label: outcomes[name][i] for label, name in present.items()},
            {label: grades[name][i] for label, name in present.items()},
        )
        for i, row in enumerate(rows)
    ]
    return body


def _ref(variants: list[Variant], name: str) -> str:
    return next(v.ref for v in variants if v.name == name)
