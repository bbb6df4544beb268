"""``loom golden …``: golden sets (evaluation rows) in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from loom.cli.output import console, print_json

app = typer.Typer(help="Golden sets: the rows agents are evaluated on.", no_args_is_help=True)

StoreOpt = typer.Option(None, "--store", envvar="LOOM_STORE", help="Store root (path or s3://…).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def _summary(facts: dict[str, Any]) -> str:
    golden = facts.get("golden") or {}
    types = golden.get("types") or {}
    cats = golden.get("categories") or {}
    return (
        f"{golden.get('rows')} rows ({types.get('STATIC', 0)} STATIC, {types.get('DYNAMIC', 0)} DYNAMIC), "
        f"{len(cats)} categories, {golden.get('with_citation', 0)} with citations"
    )


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="Golden rows, JSON Lines."),
    name: str = typer.Option(..., "--name", help="Golden set name in the store."),
    version: str | None = typer.Option(None, "--version", help="Default: vYYYYMMDD-HHMM."),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Validate FILE (every bad row reported as file:line) and publish it as golden set NAME."""
    from loom.evals.golden import import_golden
    from loom.store import Store

    m = import_golden(Store(root), file, name, version=version)
    if as_json:
        print_json(m)
        return
    facts = m.dataset or {}
    console.print(f"golden set [bold]{m.name}@{m.version}[/] (alias current): {_summary(facts)}")
    console.print(f"  content sha256 {facts.get('content_sha256')}")


@app.command("ls")
def ls_cmd(root: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List golden sets: every version, with its rows, types and categories."""
    from loom.evals.golden import list_golden
    from loom.store import Store

    store = Store(root)
    found = list_golden(store)
    if as_json:
        print_json(
            [{"ref": f"{m.name}@{m.version}", **((m.dataset or {}).get("golden") or {})} for m in found]
        )
        return
    if not found:
        console.print(
            f"no golden sets in store {store.url}; add one with 'loom golden import FILE --name NAME'"
        )
        return
    table = Table(title=f"golden sets in {store.url}")
    table.add_column("ref", no_wrap=True)
    for col in ("aliases", "rows", "STATIC", "DYNAMIC", "categories", "sha256"):
        table.add_column(col)
    aliases = {(s.artifact.name, v): k for s in store.summaries("dataset") for k, v in s.aliases.items()}
    for m in found:
        facts = m.dataset or {}
        golden = facts.get("golden") or {}
        types = golden.get("types") or {}
        table.add_row(
            f"{m.name}@{m.version}",
            aliases.get((m.name, m.version), ""),
            str(golden.get("rows")),
            str(types.get("STATIC", 0)),
            str(types.get("DYNAMIC", 0)),
            str(len(golden.get("categories") or {})),
            str(facts.get("content_sha256", ""))[:12],
        )
    console.print(table)


@app.command("show")
def show_cmd(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@ALIAS."),
    rows: int = typer.Option(5, "--rows", min=0, help="How many rows to print."),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show a golden set: its facts per category and type, and its first rows."""
    from loom.evals.golden import load_golden
    from loom.store import Store

    store = Store(root)
    golden = load_golden(store, ref)
    facts = store.resolve(golden.ref).manifest.dataset or {}
    if as_json:
        shown = [r.model_dump(mode="json") for r in golden.rows[:rows]]
        print_json(
            {"ref": golden.ref, "sha256": golden.sha256, **facts.get("golden", {}), "rows_shown": shown}
        )
        return
    console.print(f"[bold]{golden.ref}[/]: {_summary(facts)}")
    console.print(f"  content sha256 {golden.sha256}")
    for category, n in (facts.get("golden") or {}).get("categories", {}).items():
        console.print(f"  {category:32} {n}")
    for r in golden.rows[:rows]:
        console.print(r.model_dump_json(), highlight=False, soft_wrap=True)


@app.command("build-examples")
def build_examples_cmd(
    data: Path | None = typer.Option(None, "--data", help="Shared data folder (default: $LOOM_DATA)."),
    out: Path = typer.Option(Path("runs/golden"), "--out", help="Where NAME.jsonl files go."),
    do_import: bool = typer.Option(False, "--import", help="Also publish each as <agent>-golden."),
    agents: list[str] | None = typer.Option(None, "--agent", help="Only these agents (repeatable)."),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Build the example agents' golden sets from the dev splits of the shared data."""
    from loom.evals.examples import BUILDERS, build_example_golden
    from loom.evals.golden import import_golden, read_golden
    from loom.store import Store

    results = []
    for name in agents or list(BUILDERS):
        path = build_example_golden(name, data, out)
        entry: dict[str, object] = {"agent": name, "file": str(path), "rows": len(read_golden(path))}
        if do_import:
            m = import_golden(Store(root), path, f"{name}-golden")
            entry["ref"] = f"{m.name}@{m.version}"
        results.append(entry)
    if as_json:
        print_json(results)
        return
    for entry in results:
        where = f" -> [bold]{entry['ref']}[/]" if "ref" in entry else ""
        console.print(f"{entry['agent']}: {entry['rows']} rows in {entry['file']}{where}")
