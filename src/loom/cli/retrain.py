"""``loom retrain check|run AGENT``: is a retrain due, and the resumable retrain pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loom.cli.output import console, print_json

if TYPE_CHECKING:  # importing loom.agents loads the engine (torch): only when a command runs
    from loom.agents.spec import AgentEntry

app = typer.Typer(help="Retraining: whether one is due, and snapshot -> train -> eval -> gated promote.")
_O = typer.Option
MAP_HELP = "Agent map (default: $LOOM_AGENT_MAP, else ./AGENT_MODEL_MAP.json)."


def _entry(agent: str, path: Path | None) -> tuple[Path, AgentEntry]:
    from loom.agents.loader import find_map
    from loom.agents.spec import load_map_file
    from loom.evals.evaluate import agent_entry

    where = find_map(path)
    return where, agent_entry(load_map_file(where), where, agent)


@app.command("check")
def check_cmd(
    agent: str = typer.Argument(..., help="Agent name in the map."),
    path: Path | None = _O(None, "--map", help=MAP_HELP),
    extra: list[Path] = _O([], "--extra", help="More training rows available now (JSONL; repeatable)."),
    feedback: int = _O(0, "--feedback", help="Corrected answers collected since the promoted version."),
    new_share: float = _O(0.10, "--new-share", help="Due when new rows exceed this share."),
    max_age_days: float = _O(92.0, "--max-age-days", help="Due when the promoted version is older."),
    as_json: bool = _O(False, "--json"),
) -> None:
    """Compare the data behind the promoted version with what is available now."""
    from loom.evals.retrain import Thresholds, check
    from loom.store import Store

    _, entry = _entry(agent, path)
    found = check(
        Store(),
        agent,
        entry,
        extra_files=extra,
        feedback=feedback,
        thresholds=Thresholds(new_share=new_share, max_age_days=max_age_days),
    )
    if as_json:
        print_json(found)
        return
    verdict = f"[bold]{found.kind}[/] retrain due" if found.due else "no retrain due"
    console.print(f"{agent} ({found.promoted}): {verdict}", highlight=False)
    console.print(
        f"  rows: {found.rows_then} trained on, {found.rows_now} now, {found.new_rows} new "
        f"({found.new_share:.1%}); feedback {found.feedback}; age {found.age_days:.0f} days",
        highlight=False,
    )
    for reason in found.reasons:
        console.print(f"  - {reason}", highlight=False)


@app.command("run")
def run_cmd(
    agent: str = typer.Argument(..., help="Agent name in the map."),
    path: Path | None = _O(None, "--map", help=MAP_HELP),
    golden: str | None = _O(None, "--golden", help="Golden set ref (default: the map's, else AGENT-golden)."),
    extra: list[Path] = _O([], "--extra", help="More training rows (JSONL, e.g. exported feedback)."),
    feedback_log: Path | None = _O(
        None, "--feedback-log", help="The server's request log: its corrections become training rows."
    ),
    version: str | None = _O(None, "--version", help="The new version's name (default: vYYYYMMDD-HHMM)."),
    out: Path = _O(Path("runs/retrain"), "--out", help="Where training runs write checkpoints."),
    base: str | None = _O(None, "--base", help="Base ref for the eval (default: the store's default base)."),
    abandon: bool = _O(False, "--abandon", help="Give up the agent's unfinished run (what it made stays)."),
    as_json: bool = _O(False, "--json"),
) -> None:
    """snapshot -> train -> eval -> gated promote, as one run that resumes where it stopped."""
    from loom.engine import Engine
    from loom.evals.pipeline import exported_feedback, retrain
    from loom.evals.retrain import abandon as abandon_run
    from loom.evals.run import adapter_name
    from loom.store import Store

    where, entry = _entry(agent, path)
    store = Store()
    if abandon:
        gone = abandon_run(store, adapter_name(entry, agent))
        console.print(
            f"abandoned run {gone['run_id']}" if gone else f"{agent} has no unfinished run", highlight=False
        )
        return
    state = retrain(
        store,
        agent,
        entry=entry,
        golden=golden or entry.eval.golden or f"{agent}-golden",
        extra_files=lambda: (
            extra
            + (
                exported_feedback(feedback_log, agent, store, out / f"{agent}-feedback.jsonl")
                if feedback_log
                else []
            )
        ),
        out_dir=out,
        map_path=where,
        engine_factory=lambda: Engine.from_store(base, store=store),
        log=lambda line: console.print(line, highlight=False, markup=False),
        version=version,
    )
    if as_json:
        print_json(state)
