"""``loom feedback``: the feedback posted on a server's responses (``POST /v1/feedback``), and
its corrections exported as training rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import yaml
from rich.table import Table

from loom.cli.output import console, print_json
from loom.errors import LoomError

if TYPE_CHECKING:
    from loom.serve.requestlog import RequestLog

app = typer.Typer(help="Feedback on served responses: list it, export corrections as training rows.")
_O = typer.Option
LOG_HELP = "The server's request log (default: requests.sqlite beside the store, as `loom serve` writes it)."


def _open(path: Path | None) -> RequestLog:
    from loom.config import settings
    from loom.serve.requestlog import DEFAULT_RETENTION, RequestLog, default_log_path

    where = path or default_log_path(settings().store_root)
    if not where.is_file():
        raise LoomError(
            f"request log {where} does not exist; give the file `loom serve --request-log` wrote with --log"
        )
    return RequestLog(where, retention=DEFAULT_RETENTION, keep_prompts=True)


@app.command("ls")
def ls(
    agent: str | None = _O(None, "--agent", help="Only feedback on this agent's responses."),
    log: Path | None = _O(None, "--log", help=LOG_HELP),
    as_json: bool = _O(False, "--json"),
) -> None:
    """Feedback, oldest first: rating, correction and comment, with the response's agent and version."""
    from loom.evals.feedback import feedback_table

    rows = feedback_table(_open(log), agent)
    if as_json:
        print_json(rows)
        return
    table = Table("time (UTC)", "response", "agent", "version", "rating", "corrected answer", "comment")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        answer = "" if r["corrected_answer"] is None else str(r["corrected_answer"])
        table.add_row(
            when,
            r["response_id"],
            r["agent"] or "-",
            r["model_version"] or "-",
            f"{r['rating']:+d}",
            answer[:60],
            (r["comment"] or "")[:40],
        )
    console.print(table)


@app.command("export")
def export(
    agent: str = _O(..., "--agent", help="The agent whose corrected responses to export."),
    log: Path | None = _O(None, "--log", help=LOG_HELP),
    out: Path | None = _O(None, "--out", help="JSONL file to write (default: <agent>-feedback.jsonl)."),
) -> None:
    """Write the corrected answers on AGENT's responses as training rows in its input format
    (the logged payload's fields + the answer, ``id`` = the response id), and print the training
    config keys they need."""
    from loom.evals.feedback import export_feedback
    from loom.store import Store

    target = out or Path(f"{agent}-feedback.jsonl")
    result = export_feedback(_open(log), agent, store=Store(), out=target)
    console.print(f"{len(result.rows)} training rows for agent {agent} -> {target} ({result.mode} mode)")
    for why, n in result.skipped.items():
        console.print(f"[yellow]skipped {n}:[/] {why}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    config = {k: v for k, v in result.config.items() if v is not None}
    console.print("train on them with these keys in the training config (train_files: the file above):")
    typer.echo(
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1 << 16)
    )  # unwrapped: to paste
