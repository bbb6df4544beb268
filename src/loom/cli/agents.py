"""``loom agents``: list, show, validate and run the agents of a map (AGENT_MODEL_MAP.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress
from rich.table import Table

from loom.cli.output import console, print_json
from loom.errors import LoomError

app = typer.Typer(help="Agents: an adapter with its training prompt, schemas and a fallback chain.")
_O = typer.Option
MAP_HELP = "Agent map (default: $LOOM_AGENT_MAP, else ./AGENT_MODEL_MAP.json)."
CHUNK = 32  # payloads per engine burst when running a file (the progress bar moves per chunk)


def _static(path: Path | None) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """The map checked against the store's default base, without loading any weights."""
    from loom.agents.agent import BaseFacts
    from loom.agents.loader import build_agents, find_map
    from loom.agents.spec import load_map_file
    from loom.store import Store

    where = find_map(path)
    doc = load_map_file(where)
    store = Store()
    base = BaseFacts(None, None)
    default = store.default_base()
    if default is not None:
        resolved = store.resolve(default)
        base = BaseFacts(resolved.ref, resolved.manifest.base)
    agents, errors = build_agents(doc, None, store, base)
    return where, agents, errors


@app.command("ls")
def ls(
    path: Path | None = typer.Argument(None, help=MAP_HELP),
    as_json: bool = _O(False, "--json"),
) -> None:
    """The map's agents: adapter, output, fallback chain, and whether they can be served."""
    where, agents, errors = _static(path)
    rows = [{**a.info(), "status": "ok"} for a in agents.values()]
    rows += [{"name": n, "status": "error", "error": e} for n, e in errors.items()]
    if as_json:
        print_json(rows)
        return
    table = Table("agent", "adapter", "output", "fallback", "status", title=f"agents in {where}")
    for r in rows:
        out = r.get("output") or {}
        status = "ok" if r["status"] == "ok" else f"[red]{r['error']}[/]"
        table.add_row(
            r["name"],
            r.get("adapter") or "(base)",
            out.get("type", ""),
            ", ".join(r.get("fallback", [])),
            status,
        )
    console.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Agent name."),
    path: Path | None = typer.Option(None, "--map", help=MAP_HELP),
) -> None:
    """One agent as served: its prompt, input and output schemas, fallbacks and warnings (JSON)."""
    _, agents, errors = _static(path)
    if name in errors:
        raise LoomError(errors[name])
    if name not in agents:
        raise LoomError(f"no agent {name!r} in the map; agents: {sorted([*agents, *errors])}")
    print_json(agents[name].info())


@app.command("validate")
def validate(path: Path | None = typer.Argument(None, help=MAP_HELP)) -> None:
    """Check the map and every agent against the store (exit 2 on any problem)."""
    where, agents, errors = _static(path)
    for name, error in errors.items():
        console.print(f"[red]✗[/] {name}: {error}", highlight=False)
    for name, agent in agents.items():
        note = f" [yellow]({'; '.join(agent.warnings)})[/]" if agent.warnings else ""
        console.print(f"[green]✓[/] {name}{note}", highlight=False)
    if errors:
        raise LoomError(f"{len(errors)} of {len(errors) + len(agents)} agents in {where} cannot be served")


@app.command("run")
def run(
    name: str = typer.Argument(..., help="Agent name."),
    input: str | None = _O(None, "--input", help='One payload as JSON: \'{"text": "play jazz"}\'.'),
    input_file: Path | None = _O(None, "--input-file", help="JSONL of payloads (one JSON object per line)."),
    path: Path | None = _O(None, "--map", help=MAP_HELP),
    base: str | None = _O(None, "--base", help="Base ref (default: the store's default base)."),
    as_json: bool = _O(False, "--json", help="Print results as JSON lines."),
) -> None:
    """Run an agent in-process on the store's base: one payload, or a JSONL file in batches."""
    payloads = _payloads(input, input_file)
    _, checked, errors = _static(path)  # a typo or a bad row is found before any weights load
    if name in errors:
        raise LoomError(errors[name])
    if name not in checked:
        raise LoomError(f"no agent {name!r} in the map; agents: {sorted([*checked, *errors])}")
    for where, payload in payloads:
        checked[name].check_input(payload, where)
    from loom.agents import load_agents
    from loom.engine import Engine
    from loom.store import Store

    store = Store()
    engine = Engine.from_store(base, store=store)
    try:
        agent = load_agents(path, engine=engine, store=store)[name]
        results = []
        with Progress(console=console, transient=True, disable=input_file is None) as bar:
            task = bar.add_task(f"{name}", total=len(payloads))
            for start in range(0, len(payloads), CHUNK):
                chunk = [p for _, p in payloads[start : start + CHUNK]]
                results += agent.run_many(chunk)
                bar.update(task, advance=len(chunk))
    finally:
        engine.shutdown()
    for result in results:
        if as_json:
            print(json.dumps(result.to_dict(), default=str))
        else:
            answered = f"step {result.fallback.step} ({result.fallback.kind})"
            shown = json.dumps(result.output) if not isinstance(result.output, str) else result.output
            console.print(
                f"{shown}  [dim]{result.model_version.get('adapter') or answered}[/]", highlight=False
            )
            if result.error:
                console.print(f"[red]{result.error}[/]", highlight=False)
    failed = sum(r.error is not None for r in results)
    if failed:
        raise LoomError(f"{failed} of {len(results)} payloads got no answer from any step (see above)")


def _payloads(input: str | None, input_file: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(where, payload) pairs: ``--input`` or ``FILE:LINE``, for errors that name the row."""
    if (input is None) == (input_file is None):
        raise LoomError("give either --input JSON or --input-file FILE.jsonl")
    if input is not None:
        return [("--input", _json_object(input, "--input"))]
    assert input_file is not None
    if not input_file.is_file():
        raise LoomError(f"--input-file {input_file}: no such file")
    lines = [(i, line) for i, line in enumerate(input_file.read_text().splitlines(), 1) if line.strip()]
    return [(f"{input_file}:{i}", _json_object(line, f"{input_file}:{i}")) for i, line in lines]


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise LoomError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise LoomError(f"{where}: expected a JSON object of the agent's input fields")
    return value


@app.command("train")
def train_example(
    name: str = typer.Argument(..., help="Example agent: intent, qa_cited or re_ranker."),
    data: Path | None = _O(
        None, "--data", help="Shared data folder (default: $LOOM_DATA or ../shared/data)."
    ),
    out: Path = _O(Path("runs/agents"), "--out", help="Where derived data and the prepared config go."),
    max_steps: int | None = _O(None, "--max-steps", help="Override the example's steps (smoke runs)."),
    as_json: bool = _O(False, "--json", help="Print the training summary as JSON."),
) -> None:
    """Train one of the example agents (examples/agents) with `loom train` and publish it."""
    from loom.agents.examples import prepare
    from loom.cli.output import err_console
    from loom.cli.train import _report
    from loom.store import Store
    from loom.train.config import load_config
    from loom.train.run import train as run_train

    config = prepare(name, data, out)
    err_console.print(f"training {name} from {config}", highlight=False)
    cfg = load_config(config, {"max_steps": max_steps})
    result = run_train(cfg, Store(), err_console)
    if as_json:
        print_json(result.summary)
    else:
        _report(result)
