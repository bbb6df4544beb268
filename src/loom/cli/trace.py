"""``loom trace``: a model version or a response, back to its training data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from loom.cli.output import console, print_json

_O = typer.Option


def trace(
    target: str = typer.Argument(..., help="name@version, name-v1.2.0, or a response id (with --log)."),
    query: str | None = _O(None, "--query", help="Find the training rows nearest this text (BM25)."),
    top: int = _O(5, "--top", help="How many rows --query shows."),
    log: Path | None = _O(
        None, "--log", help="The server's request log (default: requests.sqlite beside a local store)."
    ),
    root: str | None = _O(None, "--store", envvar="LOOM_STORE", help="Store root."),
    as_json: bool = _O(False, "--json", help="Print the trace as JSON."),
) -> None:
    """Trace a model version (or a response) to its base, training summary, dataset snapshot and rows."""
    from loom.evals.lineage import trace_target
    from loom.store import Store

    store = Store(root)
    if log is None:
        from loom.serve.requestlog import default_log_path

        found = default_log_path(store.url)
        log = found if found.is_file() else None
    result = trace_target(store, target, log, query, top)
    if as_json:
        print_json(result.to_json())
        return
    _report(result)


def _report(t: Any) -> None:
    table = Table.grid(padding=(0, 2))
    rows: list[tuple[str, Any]] = []
    if t.response_id:
        rows.append(("response", f"{t.response_id} (model_version {t.model_version})"))
    rows += [
        ("version", t.ref + (f" ({t.label})" if t.label else "")),
        ("kind", t.kind + (f", agent {t.agent}" if t.agent else "")),
        ("created", t.created_at),
        ("base", f"{t.base['ref']} (fingerprint {t.base['fingerprint']})"),
    ]
    training = t.training
    if training:
        rows.append(("training", _outcome(training)))
        rows.append(("hyper-parameters", _pairs(training.get("hyperparameters", {}))))
        rows.append(("prompt", _pairs({k: v for k, v in training.get("prompt", {}).items() if v})))
        if "version_bump" in training:
            bump = training["version_bump"]
            rows.append(
                ("version bump", f"{bump.get('kind')} after {bump.get('previous')}: {bump['reason']}")
            )
    if t.snapshot:
        s = t.snapshot
        rows.append(("snapshot", f"{s.ref}: {s.rows} rows (content sha256 {s.content_sha256})"))
        rows += [("  file", f"{f['path']} ({f['size']:,} bytes)") for f in s.files]
    rows += [("problem", p) for p in t.problems]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", escape(str(value)))
    console.print(table)
    if t.query is not None:
        _print_rows(t)


def _outcome(training: dict[str, Any]) -> str:
    parts = [f"{k} {training[k]}" for k in ("status", "steps", "final_train_loss") if k in training]
    return ", ".join(parts) or "(no outcome recorded)"


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(none recorded)"


def _print_rows(t: Any) -> None:
    if not t.rows:
        console.print(f"no training row of {t.snapshot.ref} shares a word with the query", highlight=False)
        return
    table = Table(title=f"rows of {t.snapshot.ref} nearest {t.query!r} (BM25)", title_justify="left")
    table.add_column("row id")
    table.add_column("score", justify="right")
    table.add_column("row", overflow="fold")
    for r in t.rows:
        text = r["row"] if isinstance(r["row"], str) else json.dumps(r["row"], ensure_ascii=False)
        table.add_row(escape(r["row_id"]), f"{r['score']:.3f}", escape(text[:400]))
    console.print(table)
