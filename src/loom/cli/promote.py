"""``loom promote``, ``loom rollback``, ``loom versions``: gated promotion and its log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from loom.cli.output import console, err_console, print_json
from loom.evals.gates import GateResult
from loom.evals.promotion import PromotionEvent

_O = typer.Option
StoreOpt = _O(None, "--store", envvar="LOOM_STORE", help="Store root (path or s3://…).")
JsonOpt = _O(False, "--json", help="Print JSON instead of a table.")


def promote_cmd(
    ref: str = typer.Argument(..., help="The version to promote: NAME@VERSION."),
    golden: str | None = _O(
        None, "--golden", help="Golden set the eval must be against (default: latest eval)."
    ),
    agents: Path | None = _O(
        None,
        "--map",
        "--agents",
        help="Agent map with the gates (default: $LOOM_AGENT_MAP, else ./AGENT_MODEL_MAP.json).",
    ),
    force: bool = _O(False, "--force", help="Promote even when gates fail (needs --reason)."),
    reason: str | None = _O(None, "--reason", help="Why (kept in the promotion log)."),
    alias: str = _O("current", "--alias", help="Alias to move."),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Move ALIAS (current) to REF when its eval passes the agent's gates; every decision is logged."""
    from loom.evals.promotion import PromotionRefused, gates_for, promote
    from loom.refs import parse_ref
    from loom.store import Store

    store = Store(root)
    gates, source = gates_for(parse_ref(ref).name, agents)
    if not as_json:
        err_console.print(f"gates: {source}", highlight=False)
    try:
        decision = promote(store, ref, golden=golden, gates=gates, force=force, reason=reason, alias=alias)
    except PromotionRefused as exc:
        _show(exc.decision.event, exc.decision.gates, as_json, source)
        raise
    _show(decision.event, decision.gates, as_json, source)
    if not as_json:
        e = decision.event
        how = (
            "[yellow]force-promoted[/] (gates failed)"
            if e.action == "force-promote"
            else "[green]promoted[/]"
        )
        console.print(f"{how} {e.ref}: {alias} {e.from_version or '(none)'} → {e.to_version}")


def _show(event: PromotionEvent, results: list[GateResult], as_json: bool, source: str) -> None:
    if as_json:
        print_json({**event.model_dump(mode="json"), "gates_source": source})
        return
    table = Table(
        "gate",
        "threshold",
        "value",
        "result",
        "detail",
        title=f"gates for {event.ref} (eval {event.eval_id})",
    )
    for r in results:
        result = (
            "[green]pass[/]" if r.passed and r.measured else "[red]fail[/]" if not r.passed else "skipped"
        )
        value = "-" if r.value is None else f"{r.value:.4g}"
        table.add_row(r.name, str(r.threshold), value, result, r.detail)
    console.print(table)


def rollback_cmd(
    name: str = typer.Argument(..., help="Artifact name."),
    alias: str = _O("current", "--alias", help="Alias to move back."),
    root: str | None = StoreOpt,
) -> None:
    """Move ALIAS (default current) back to its previous target; logged in the promotion log."""
    from loom.evals.promotion import rollback
    from loom.store import Store

    event = rollback(Store(root), name, alias)
    console.print(f"{name}@{alias} rolled back to {event.to_version} (was {event.from_version})")


def versions_cmd(
    name: str = typer.Argument(..., help="Artifact name."),
    agents: Path | None = _O(
        None,
        "--map",
        help="Agent map whose gates decide the use cases (default: $LOOM_AGENT_MAP, ./AGENT_MODEL_MAP.json).",
    ),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """NAME's versions: base, dataset snapshot, key hyper-parameters, latest eval, status and
    recommended use cases (golden-set categories where it passes its gates)."""
    from loom.evals.promotion import gates_for, versions_table
    from loom.store import Store

    gates, _source = gates_for(name, agents)
    rows = versions_table(Store(root), name, gates)
    if as_json:
        print_json(rows)
        return
    cols = (
        "version",
        "created",
        "base",
        "dataset",
        "r/alpha",
        "lr",
        "epochs/steps",
        "eval",
        "status",
        "aliases",
        "use cases",
    )
    table = Table(*cols, title=f"versions of {name}")
    for row in rows:
        table.add_row(
            row["version"],
            row["created"][:16].replace("T", " "),
            row["base"] or "-",
            row["dataset"] or "-",
            _pair(row["r"], row["alpha"]),
            "-" if row["lr"] is None else f"{row['lr']:g}",
            _pair(row["epochs"], row["steps"]),
            _eval_cell(row["eval"]),
            _STATUS_STYLE.get(row["status"], row["status"]),
            ", ".join(row["aliases"]),
            ", ".join(row["recommended_use_cases"][:6]) or "-",
        )
    console.print(table if rows else f"{name} has no versions")


_STATUS_STYLE = {"deployed": "[green]deployed[/]", "failed": "[red]failed[/]", "archived": "[dim]archived[/]"}
_HEADLINE = (
    ("accuracy", "acc"),
    ("citation_presence", "cite"),
    ("refusal_accuracy", "refuse"),
    ("latency_p95_s", "p95"),
)


def _pair(a: Any, b: Any) -> str:
    return f"{'-' if a is None else a}/{'-' if b is None else b}"


def _eval_cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "-"
    if "error" in summary:
        return "[red]damaged: run loom store verify[/]"
    metrics = summary["metrics"]
    parts = [f"{short} {metrics[key]:.3g}" for key, short in _HEADLINE if metrics.get(key) is not None]
    golden = (summary.get("golden") or {}).get("ref") or "?"
    return f"{', '.join(parts) or 'no metrics'} on {golden}"
