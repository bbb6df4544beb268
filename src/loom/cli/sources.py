"""``loom sources …``: the registry agents' citations resolve against."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from loom.cli.output import console, print_json
from loom.errors import LoomError, NotFoundError

app = typer.Typer(help="Citation sources: names and URLs for the ids agents cite.", no_args_is_help=True)

RegistryOpt = typer.Option(
    None, "--registry", envvar="LOOM_SOURCES", help="Source registry file (.json, .sqlite or .db)."
)
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _registry_path(path: Path | None) -> Path:
    if path is None:
        raise LoomError("no source registry given; pass --registry PATH or set LOOM_SOURCES")
    return path


@app.command("unknown")
def unknown_cmd(registry: Path | None = RegistryOpt, as_json: bool = JsonOpt) -> None:
    """Ids agents cited that the registry lacks, most cited first: what to add next."""
    from loom.agents.sources import SourceRegistry

    with SourceRegistry.open(_registry_path(registry)) as reg:
        rows = reg.unknown()
        where = reg.unknown_path
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    if not rows:
        console.print(f"no unknown source ids recorded in {where}", markup=False)
        return
    table = Table("id", "count", "first seen", "last seen", "agent", title=f"unknown sources ({where})")
    for r in rows:
        table.add_row(escape(r.id), str(r.count), r.first_seen, r.last_seen, escape(r.agent or ""))
    console.print(table)


@app.command("build-squad")
def build_squad_cmd(
    out: Path = typer.Argument(..., help="Registry to write or update (.json, .sqlite or .db)."),
    data: list[Path] = typer.Option(..., "--data", help="SQuAD-style JSONL file (repeat for several)."),
    as_json: bool = JsonOpt,
) -> None:
    """Add one source per SQuAD passage (id squad:<passage_id>, Wikipedia URL) to OUT."""
    from loom.agents.sources import build_squad_registry

    count = build_squad_registry(data, out)
    if as_json:
        print_json({"registry": str(out), "sources": count})
        return
    console.print(f"[green]wrote[/] {count} sources to [bold]{out}[/]")


@app.command("show")
def show_cmd(source_id: str, registry: Path | None = RegistryOpt, as_json: bool = JsonOpt) -> None:
    """Show the name and URL of SOURCE_ID (domain:entity_id, as in <<SRC:domain:entity_id>>)."""
    from loom.agents.sources import SourceRegistry

    path = _registry_path(registry)
    with SourceRegistry.open(path) as reg:
        source = reg.get(source_id)
    if source is None:
        raise NotFoundError(
            f"source {source_id!r} is not in the registry {path}; check the id "
            "('loom sources unknown' lists cited ids it lacks) or add it to the registry"
        )
    if as_json:
        print_json(asdict(source))
        return
    table = Table.grid(padding=(0, 2))
    for key, value in (("id", source.id), ("name", source.name), ("url", source.url or "-")):
        table.add_row(f"[bold]{key}[/]", escape(value))
    console.print(table)
