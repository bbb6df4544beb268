"""``loom data …``: dataset snapshots."""

from __future__ import annotations

from pathlib import Path

import typer

from loom.cli.output import console, print_json

app = typer.Typer(help="Training data: snapshots into the store.", no_args_is_help=True)


@app.command("snapshot")
def snapshot_cmd(
    files: list[str] = typer.Argument(..., help="JSON/JSONL files or globs."),
    name: str = typer.Option(..., "--name", help="Snapshot name in the store."),
    version: str | None = typer.Option(None, "--version"),
    label_field: str = typer.Option("label", "--label-field", help="Field counted per label."),
    root: str | None = typer.Option(None, "--store", envvar="LOOM_STORE"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Publish data files as a dataset snapshot (content hash, row ids, breakdowns)."""
    from loom.data.reader import expand_files
    from loom.data.snapshot import snapshot
    from loom.store import Store

    paths: list[Path] = expand_files(files)
    m, created = snapshot(Store(root), paths, name=name, version=version, label_field=label_field)
    if as_json:
        print_json(m)
        return
    facts = m.dataset or {}
    verb = "published" if created else "same bytes already stored as"
    console.print(f"{verb} [bold]{m.name}@{m.version}[/]: {facts.get('rows')} rows")
    console.print(f"  content sha256 {facts.get('content_sha256')}")
    console.print(f"  per source {facts.get('rows_per_source')}")
    if facts.get("rows_per_label"):
        console.print(f"  per label  {facts.get('rows_per_label')}")
