"""``loom eval AGENT``: candidates, the promoted version and the base side by side on a golden set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from loom.cli.output import console, err_console, print_json

_O = typer.Option
MAP_HELP = "Agent map (default: $LOOM_AGENT_MAP, else ./AGENT_MODEL_MAP.json)."
SHOWN = (
    ("accuracy", "accuracy"),
    ("schema_validity", "valid"),
    ("citation_presence", "cited"),
    ("citation_correct", "cited right"),
    ("refusal_accuracy", "refusals"),
    ("latency_p50_s", "p50 s"),
    ("latency_p95_s", "p95 s"),
)


def eval_command(
    agent: str = typer.Argument(..., help="Agent name in the map."),
    golden: str | None = _O(None, "--golden", help="Golden set ref (default: the map's, else AGENT-golden)."),
    candidates: str | None = _O(
        None, "--candidates", help="Comma-separated adapter refs to judge (default: the promoted version)."
    ),
    path: Path | None = _O(None, "--map", help=MAP_HELP),
    base: str | None = _O(None, "--base", help="Base ref (default: the store's default base)."),
    limit: int | None = _O(None, "--limit", help="Only the first N golden rows (smoke runs)."),
    scorer: str | None = _O(
        None, "--scorer", help="exact | contains | f1 | json | auto | module:function (default: the map's)."
    ),
    concurrency: int = _O(16, "--concurrency", help="Requests in flight (all variants together)."),
    report: Path | None = _O(None, "--report", help="Write report.md and report.html into this folder."),
    save: bool = _O(True, "--save/--no-save", help="Store the results beside each candidate version."),
    as_json: bool = _O(False, "--json", help="Print the result bodies as JSON."),
) -> None:
    """Evaluate an agent on a golden set: each candidate beside the promoted version and the
    base with the same prompt, in one batched run; results are stored beside each candidate."""
    from loom.engine import Engine
    from loom.evals.evaluate import evaluate
    from loom.store import Store

    store = Store()
    refs = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    engine = Engine.from_store(base, store=store)
    try:
        with _bar(as_json) as (bar, task):
            run = evaluate(
                agent,
                engine=engine,
                store=store,
                golden=golden,
                candidates=refs,
                map_path=path,
                limit=limit,
                scorer=scorer,
                concurrency=concurrency,
                save=save,
                tick=lambda: bar.advance(task),
                total=lambda n: bar.update(task, total=n),
            )
    finally:
        engine.shutdown()
    if as_json:
        print_json([{k: v for k, v in b.items() if k != "rows"} for b in run.bodies])
    else:
        _print(run.bodies)
        for rel in run.saved:
            console.print(f"[dim]saved {rel}[/]", highlight=False)
    if report is not None:
        from loom.evals.report import write_report

        for p in write_report(run.bodies, report):
            err_console.print(f"wrote {p}", highlight=False)


class _bar:
    """A progress bar on stderr (rows x variants), quiet under --json."""

    def __init__(self, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=quiet,
        )

    def __enter__(self) -> tuple[Progress, Any]:
        self.progress.start()
        return self.progress, self.progress.add_task("eval", total=None)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _print(bodies: list[dict[str, Any]]) -> None:
    from loom.evals.report import fmt_metric, merged_variants

    first = bodies[0]
    table = Table(title=f"{first['agent']} on {first['golden']['ref']} ({first['golden']['rows']} rows)")
    table.add_column("variant")
    table.add_column("ref")
    for _, title in SHOWN:
        table.add_column(title, justify="right")
    for label, v in merged_variants(bodies).items():
        table.add_row(label, v["ref"], *(fmt_metric(v["metrics"].get(k), k) for k, _ in SHOWN))
    console.print(table)
    for body in bodies:
        comparison = body.get("comparison")
        if not comparison:
            continue
        console.print(f"{body['subject']} vs {comparison['against']}:", highlight=False)
        for metric, c in comparison["metrics"].items():
            lo, hi = c["ci"]
            console.print(
                f"  {metric}: {100 * c['diff']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"p={c['p_value']:.3g} -> {c['verdict']}",
                highlight=False,
            )
