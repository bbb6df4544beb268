"""``loom store …``: list, show, import, publish, verify, alias, rollback, gc."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from loom.cli.output import byte_progress, console, fail, human_bytes, print_json
from loom.cli.quantize import quantize
from loom.store import Store
from loom.store.manifest import Manifest
from loom.store.store import ArtifactSummary, Resolved
from loom.store.variants import cached_variants

app = typer.Typer(help="The model store: versions, aliases, verification.", no_args_is_help=True)
alias_app = typer.Typer(help="Move and list aliases (current, champion, …).", no_args_is_help=True)
app.add_typer(alias_app, name="alias")

StoreOpt = typer.Option(None, "--store", envvar="LOOM_STORE", help="Store root (path or s3://…).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


class KindChoice(str, Enum):
    base = "base"
    adapter = "adapter"
    dataset = "dataset"


def _store(root: str | None) -> Store:
    return Store(root)


def _summary_json(s: ArtifactSummary) -> dict[str, Any]:
    a = s.artifact
    return {"kind": a.kind, "name": a.name, "agent": a.agent, "versions": s.versions, "aliases": s.aliases}


def _published(m: Manifest, as_json: bool) -> None:
    if as_json:
        print_json(m)
        return
    console.print(
        f"[green]published[/] {m.kind} [bold]{m.name}@{m.version}[/]"
        + (f" for agent {m.agent}" if m.agent else "")
        + f" ({len(m.files)} files, {human_bytes(m.total_bytes)})"
    )


@app.command("ls")
def ls(
    kind: KindChoice | None = typer.Option(None, "--kind", help="Only this kind."),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List artifacts with their versions and aliases."""
    store = _store(root)
    rows = store.summaries(kind.value if kind else None)
    if as_json:
        print_json([_summary_json(s) for s in rows])
        return
    table = Table(title=f"store {store.url}")
    for col in ("kind", "name", "agent", "versions", "latest", "aliases"):
        table.add_column(col)
    for s in rows:
        aliases = ", ".join(f"{k}→{v}" for k, v in sorted(s.aliases.items()))
        latest = s.versions[-1] if s.versions else "-"
        table.add_row(
            s.artifact.kind, s.artifact.name, s.artifact.agent or "", str(len(s.versions)), latest, aliases
        )
    console.print(table if rows else f"store {store.url} is empty; try 'loom store import-base --default'")


@app.command("show")
def show(ref: str, root: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Show REF: a bare NAME lists all its versions and aliases, then the version 'current'
    points at (--json: that manifest, or the version list when there is no current);
    NAME@VERSION or NAME@ALIAS shows that version's manifest."""
    from loom.refs import DEFAULT_ALIAS, parse_ref

    store = _store(root)
    parsed = parse_ref(ref)
    if parsed.kind != "store" or parsed.selector is not None:
        _show_version(store, store.resolve(parsed), as_json)
        return
    artifact = store.find(parsed.name)
    summary = store.summary(artifact)
    current = store.resolve(parsed) if DEFAULT_ALIAS in summary.aliases else None
    if as_json:
        print_json(current.manifest if current else _summary_json(summary))
        return
    _show_versions(store, summary)
    if current is None:
        console.print(
            f"{artifact.name} has no '{DEFAULT_ALIAS}' alias: show a version with "
            f"'loom store show {artifact.name}@VERSION', or set one with "
            f"'loom store alias set {artifact.name} {DEFAULT_ALIAS} VERSION'"
        )
        return
    console.print(f"\n[bold]{artifact.name}@{DEFAULT_ALIAS}[/] → {current.version}")
    _show_version(store, current, as_json=False)


def _show_versions(store: Store, summary: ArtifactSummary) -> None:
    a = summary.artifact
    table = Table("version", "created", "size", "status", "aliases", title=a.describe())
    for version in summary.versions:
        m = store.manifest(a, version)
        aliases = ", ".join(sorted(k for k, v in summary.aliases.items() if v == version))
        table.add_row(
            version, f"{m.created_at:%Y-%m-%d %H:%M}", human_bytes(m.total_bytes), m.status, aliases
        )
    console.print(table)


def _show_version(store: Store, resolved: Resolved, as_json: bool) -> None:
    m = resolved.manifest
    if as_json:
        print_json(m)
        return
    table = Table.grid(padding=(0, 2))
    facts: list[tuple[str, Any]] = [
        ("ref", resolved.ref),
        ("kind", m.kind),
        ("agent", m.agent),
        ("created", f"{m.created_at:%Y-%m-%d %H:%M:%S} UTC by {m.created_by}"),
        ("source", f"{m.source.type}: {m.source.uri}"),
        ("license", m.license),
        ("status", m.status),
        ("size", human_bytes(m.total_bytes)),
    ]
    if m.base:
        b = m.base
        facts += [
            ("architecture", f"{b.arch.architecture} ({b.arch.model_type})"),
            ("parameters", f"{b.parameter_count:,}"),
            ("dtype", b.dtype),
            ("approx_vram_mb", b.approx_vram_mb),
            ("variants (MB)", ", ".join(f"{k}={v}" for k, v in b.variant_vram_mb.items())),
            ("quantized_variants", ", ".join(b.quantized_variants)),
            ("cached variants", ", ".join(cached_variants(store, resolved)) or "-"),
            ("peft_support", f"{b.peft_support} (default targets {', '.join(b.default_target_modules)})"),
            ("fingerprint", b.fingerprint),
            ("chat template", (b.chat_template_sha256 or "none")[:16]),
        ]
    if m.adapter:
        a = m.adapter
        facts += [
            ("base", f"{a.base_ref} ({a.base_fingerprint})"),
            ("lora", f"r={a.r} alpha={a.alpha} dropout={a.dropout}"),
            ("target_modules", ", ".join(a.target_modules)),
            ("parameters", f"{a.parameter_count:,}"),
        ]
    if m.dataset:
        facts.append(("rows", m.dataset.get("rows")))
    aliases = {n: f.version for n, f in store.aliases(resolved.artifact).items()}
    facts.append(("aliases", ", ".join(f"{k}→{v}" for k, v in sorted(aliases.items())) or "-"))
    for key, value in facts:
        if value is not None:
            table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)
    files = Table("file", "size", "sha256")
    for f in m.files:
        files.add_row(f.path, human_bytes(f.size), f.sha256[:16] + "…")
    console.print(files)


app.command("quantize")(quantize)


@app.command("import-base")
def import_base(
    source: str | None = typer.Argument(
        None, help="A Hugging Face model folder, a .gguf file, or a hub id (hf:org/model)."
    ),
    default: bool = typer.Option(False, "--default", help="Import the embedded SmolLM2-135M-Instruct."),
    name: str | None = typer.Option(None, "--name", help="Store name (default: from the source)."),
    version: str | None = typer.Option(None, "--version", help="Version (default vYYYYMMDD-HHMM)."),
    alias: str | None = typer.Option("current", "--alias", help="Alias to point at the new version."),
    license: str | None = typer.Option(None, "--license", help="License of the weights."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (hub ids only)."),
    set_default: bool = typer.Option(False, "--set-default", help="Make it the store's default base."),
    if_missing: bool = typer.Option(
        False, "--if-missing", help="Do nothing when the name already has a 'current' version."
    ),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Import a base model into the store (safetensors + tokenizer, facts computed)."""
    from loom.errors import NotFoundError
    from loom.refs import parse_ref
    from loom.store import importers

    store = _store(root)
    if if_missing:
        wanted = importers.DEFAULT_BASE_NAME if default else name
        if wanted is None:
            fail("--if-missing needs --default or --name NAME")
        try:
            existing = store.resolve(f"{wanted}@current")
        except NotFoundError:
            pass
        else:
            if as_json:
                print_json(existing.manifest)
            else:
                console.print(f"{existing.ref} is already in the store; nothing to import")
            return
    kw: dict[str, Any] = {"version": version, "alias": alias or None, "license": license}
    with byte_progress("hashing") as progress:
        kw["progress"] = progress
        if default:
            if source:
                fail("give either --default or a SOURCE, not both")
            m = importers.import_default(store, **kw)
        elif source is None:
            fail("nothing to import: give a SOURCE (folder, .gguf file, hf:org/model) or --default")
            return
        elif Path(source).expanduser().is_file():
            m = importers.import_gguf(store, source, name, **kw)
        elif Path(source).expanduser().is_dir():
            m = importers.import_hf_dir(store, source, name, **kw)
        else:
            hub_id = source[3:] if source.startswith("hf:") else source
            if "/" not in hub_id or source.startswith(("/", ".", "~")):
                fail(f"{source}: no such file or folder, and not a hub id (expected hf:org/model)")
            m = importers.import_hub(store, parse_ref(f"hf:{hub_id}").name, name, revision=revision, **kw)
    if set_default:
        store.set_default_base(m.name)
    _published(m, as_json)


@app.command("publish")
def publish(
    path: Path = typer.Argument(..., help="Folder (base, adapter) or data file (dataset)."),
    kind: KindChoice = typer.Option(..., "--kind", help="What PATH holds."),
    name: str = typer.Option(..., "--name", help="Store name."),
    agent: str | None = typer.Option(None, "--agent", help="Agent an adapter serves (adapters only)."),
    base: str | None = typer.Option(None, "--base", help="Base ref an adapter was trained on."),
    version: str | None = typer.Option(None, "--version", help="Version (default vYYYYMMDD-HHMM)."),
    alias: str | None = typer.Option(None, "--alias", help="Alias to point at the new version."),
    license: str | None = typer.Option(None, "--license"),
    description: str | None = typer.Option(None, "--description"),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Publish a local folder or file as a new immutable version."""
    from loom.store import adapters, importers

    store = _store(root)
    kw: dict[str, Any] = {
        "version": version,
        "alias": alias,
        "license": license,
        "description": description,
    }
    with byte_progress("hashing") as progress:
        kw["progress"] = progress
        if kind is KindChoice.base:
            m = importers.import_hf_dir(store, path, name, **kw)
        elif kind is KindChoice.adapter:
            if not agent:
                fail("an adapter needs --agent AGENT (the agent it serves)")
                return
            m = adapters.publish_adapter(store, path, agent=agent, name=name, base=base, **kw)
        else:
            from loom.data.snapshot import snapshot

            files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
            m, _created = snapshot(store, files, name=name, reuse=False, **kw)
    _published(m, as_json)


@app.command("verify")
def verify(
    ref: str | None = typer.Argument(None, help="name, name@version, or nothing for everything."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        envvar="MODEL_STORE_DRY_RUN",
        help="Check paths, sizes, manifests, shapes; no hashing.",
    ),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Recompute checksums and check manifests and adapter/base fit. Exit 1 on any problem."""
    from loom.store.verify import verify_store

    store = _store(root)
    with byte_progress("verifying") as progress:
        reports = verify_store(store, ref, dry_run=dry_run, progress=progress)
    bad = [r for r in reports if not r.ok]
    if as_json:
        print_json([{**r.__dict__, "ok": r.ok} for r in reports])
    else:
        table = Table("ref", "kind", "files", "bytes", "result", title=f"verify {store.url}")
        for r in reports:
            result = "[green]ok[/]" if r.ok else "[red]" + "\n".join(r.problems) + "[/]"
            table.add_row(r.ref, r.kind, str(r.checked_files), human_bytes(r.checked_bytes), result)
        console.print(table)
        mode = " (dry run: no checksums)" if dry_run else ""
        console.print(f"{len(reports) - len(bad)} ok, {len(bad)} with problems{mode}")
    if bad:
        raise typer.Exit(1)


@alias_app.command("set")
def alias_set(name: str, alias: str, version: str, root: str | None = StoreOpt) -> None:
    """Point ALIAS of NAME at VERSION (atomic)."""
    f = _store(root).set_alias(name, alias, version)
    console.print(f"{name}@{alias} → {f.version}")


@alias_app.command("ls")
def alias_ls(name: str, root: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List the aliases of NAME with their history."""
    store = _store(root)
    found = store.aliases(store.find(name))
    if as_json:
        print_json(list(found.values()))
        return
    table = Table("alias", "version", "earlier", "last move")
    for a in found.values():
        last = a.history[-1] if a.history else None
        moved = f"{last.action} {last.at:%Y-%m-%d %H:%M} by {last.by}" if last else ""
        table.add_row(a.alias, a.version, ", ".join(reversed(a.previous)), moved)
    console.print(table)


@app.command("rollback")
def rollback(
    name: str,
    alias: str = typer.Option("current", "--alias", help="Alias to move back."),
    root: str | None = StoreOpt,
) -> None:
    """Move ALIAS (default current) back to its previous target (logged, like 'loom rollback')."""
    from loom.evals.promotion import rollback as logged_rollback

    event = logged_rollback(_store(root), name, alias)
    console.print(f"{name}@{alias} rolled back to {event.to_version}")


@app.command("gc")
def gc(
    keep: int | None = typer.Option(None, "--keep", help="Keep the newest N versions per artifact."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would be removed and why the rest stays."
    ),
    lease_ttl: float = typer.Option(
        60.0, "--lease-ttl", help="Seconds after its last heartbeat a serving process's lease expires."
    ),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Remove abandoned staging folders, stale leases and (with --keep) old versions nothing needs.

    A version stays while an alias points at it, while it is in an alias's rollback
    history, while a running server holds a lease on it, or while a stored adapter
    was trained on it; the report says which.
    """
    from loom.store.gc import collect

    if keep is not None and keep < 1:
        fail(f"--keep must be at least 1 (got {keep})")
    report = collect(_store(root), keep=keep, dry_run=dry_run, lease_ttl_s=lease_ttl)
    if as_json:
        print_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.leftovers + report.leases + report.versions:
        console.print(f"{verb} {item}")
    for item in report.kept:
        console.print(item)
    console.print(
        f"{verb} {len(report.leftovers)} leftovers, {len(report.leases)} stale leases and "
        f"{len(report.versions)} versions, {human_bytes(report.freed_bytes)}; "
        f"kept {len(report.kept)} older versions in use"
    )
