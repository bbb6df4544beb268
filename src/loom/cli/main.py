"""Entry point: ``loom``. Library errors become one red line and exit code 2."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from loom import __version__
from loom.cli import agents as agents_cli
from loom.cli import bench as bench_cli
from loom.cli import conversations as conversations_cli
from loom.cli import data as data_cli
from loom.cli import export as export_cli
from loom.cli import feedback as feedback_cli
from loom.cli import golden as golden_cli
from loom.cli import promote as promote_cli
from loom.cli import retrain as retrain_cli
from loom.cli import sources as sources_cli
from loom.cli import store as store_cli
from loom.cli.chat import chat
from loom.cli.doctor import doctor
from loom.cli.evals import eval_command
from loom.cli.output import err_console
from loom.cli.serve import serve
from loom.cli.trace import trace
from loom.cli.train import train
from loom.errors import LoomError


class LoomGroup(TyperGroup):
    """Turns a LoomError anywhere below into its message and exit code 2 (no traceback):
    the messages already name the input, the problem and the fix."""

    def invoke(self, ctx: Any) -> Any:  # typer vendors its own click Context
        try:
            return super().invoke(ctx)
        except LoomError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise SystemExit(2) from None


app = typer.Typer(
    name="loom",
    cls=LoomGroup,
    help="Loom: many task-specialised LoRA agents on one shared base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(store_cli.app, name="store")
app.add_typer(data_cli.app, name="data")
app.add_typer(sources_cli.app, name="sources")
app.command("train")(train)
app.command("trace")(trace)
app.command("doctor")(doctor)
app.command("serve")(serve)
app.command("chat")(chat)
app.add_typer(bench_cli.app, name="bench")
app.add_typer(agents_cli.app, name="agents")
app.command("eval")(eval_command)
app.add_typer(golden_cli.app, name="golden")
app.add_typer(retrain_cli.app, name="retrain")
app.command("promote")(promote_cli.promote_cmd)
app.command("rollback")(promote_cli.rollback_cmd)
app.command("versions")(promote_cli.versions_cmd)
app.add_typer(feedback_cli.app, name="feedback")
app.add_typer(export_cli.app, name="export")
app.add_typer(conversations_cli.app, name="conversations")


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print Loom's version and exit."),
) -> None:
    if version:
        typer.echo(f"loom {__version__}")
        raise typer.Exit()


def main() -> None:
    app()
