"""``loom retrain run``: the steps after the snapshot (train, eval, gated promote), each one
finding what an interrupted earlier attempt already made instead of making it twice.

The step functions take the store and the run's state (``loom.evals.retrain``) and return what
the state records for them; ``retrain`` saves the state after each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from loom.errors import LoomError
from loom.evals.promotion import PromotionRefused, gates_for, headline, promote, read_log
from loom.evals.results import latest_eval
from loom.evals.retrain import Step, plan, run_lock, run_steps, snapshot_files, step_snapshot, unfinished
from loom.evals.run import adapter_name
from loom.store.store import Store


def train_config(store: Store, state: dict[str, Any], out_dir: Path) -> Any:
    """The promoted version's own hyper-parameters, on the frozen snapshot, published under the
    version the run chose, without moving any alias (promotion is a later, gated step)."""
    from loom.train.config import TrainConfig

    source = store.resolve(state["from"]).manifest.training_summary or {}
    hp = dict(source.get("hyperparameters") or {})
    files = snapshot_files(store, state["steps"]["snapshot"]["snapshot"])
    kept = {k: v for k, v in hp.items() if k in TrainConfig.model_fields}
    if kept.get("max_train_samples") is not None:
        kept["max_train_samples"] += state.get("extra_rows", 0)  # the new rows must not be cut off
    kept.update(
        train_files=[str(f) for f in files],
        eval_files=[],
        model_name_or_path=(source.get("base") or {}).get("ref") or hp.get("model_name_or_path"),
        output_dir=out_dir / state["run_id"],
        publish=True,
        adapter_version=state["version"],
        alias=None,
        resume=False,
        bump=None,
    )
    return TrainConfig(**kept)


def step_train(out_dir: Path) -> Step:
    def run(store: Store, state: dict[str, Any]) -> dict[str, Any]:
        ref = f"{state['adapter']}@{state['version']}"
        artifact = store.find(state["adapter"])
        if store.has_version(artifact, state["version"]):  # published before the run was cut off
            return {"version": ref, "trained_before": True}
        from loom.train.run import train

        result = train(train_config(store, state, out_dir), store)
        return {
            "version": ref,
            "steps": result.summary.get("steps"),
            "loss": result.summary.get("final_train_loss"),
        }

    return run


def step_eval(map_path: Path | str | None, engine_factory: Callable[[], Any]) -> Step:
    def run(store: Store, state: dict[str, Any]) -> dict[str, Any]:
        from loom.evals.evaluate import evaluate
        from loom.evals.golden import load_golden

        ref = state["steps"]["train"]["version"]
        golden = load_golden(store, state["golden"])
        record = latest_eval(store, ref, golden.sha256)
        if record is not None:  # stored before the run was cut off
            return {"eval_id": record.eval_id, "golden": golden.ref, "metrics": headline(record.body)}
        engine = engine_factory()
        try:
            done = evaluate(
                state["agent"],
                engine=engine,
                store=store,
                golden=golden.ref,
                candidates=[ref],
                map_path=map_path,
            )
        finally:
            engine.shutdown()
        body = done.bodies[0]
        return {"eval_id": body["eval_id"], "golden": golden.ref, "metrics": headline(body)}

    return run


def step_promote(map_path: Path | str | None) -> Step:
    def run(store: Store, state: dict[str, Any]) -> dict[str, Any]:
        ref = state["steps"]["train"]["version"]
        since = datetime.fromisoformat(state["created_at"])
        logged = [
            e
            for e in read_log(store, store.find(state["adapter"]))
            if e.ref == ref and e.action in ("promote", "refused") and e.when >= since
        ]
        if logged:  # decided before the run was cut off (the log is written last)
            return {"promoted": logged[-1].action == "promote", "logged_before": True}
        gates, source = gates_for(state["adapter"], map_path)
        try:
            decision = promote(store, ref, golden=state["steps"]["eval"]["golden"], gates=gates)
        except PromotionRefused as exc:
            failed = [asdict(g) for g in exc.decision.gates if not g.passed]
            return {"promoted": False, "gates_from": source, "failed_gates": failed}
        return {"promoted": decision.promoted, "gates_from": source}

    return run


def exported_feedback(log_path: Path, agent: str, store: Store, out: Path) -> list[Path]:
    """``agent``'s corrections from the server's request log as training rows in its own input
    format (written to ``out``), or nothing when there are none."""
    from loom.evals.feedback import export_feedback
    from loom.serve.requestlog import RequestLog

    if not log_path.is_file():
        raise LoomError(f"--feedback-log {log_path}: no request log there; give the server's requests.sqlite")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = RequestLog.reader(log_path)
    try:
        done = export_feedback(log, agent, store=store, out=out)
    finally:
        log.close()
    if not done.rows:
        return []
    if done.mode != "template":
        raise LoomError(
            f"{agent}'s corrections do not fit its training output template ({'; '.join(done.notes)}); "
            f"export them with 'loom feedback export --agent {agent}' and train with the config it prints"
        )
    return [out]


def retrain(
    store: Store,
    agent: str,
    *,
    entry: Any,
    golden: str,
    extra_files: Callable[[], list[Path]],
    out_dir: Path,
    map_path: Path | str | None,
    engine_factory: Callable[[], Any],
    log: Callable[[str], None],
    version: str | None = None,
) -> dict[str, Any]:
    """Resume the adapter's unfinished run if there is one, else plan a new one; run its steps."""
    adapter = adapter_name(entry, agent)
    with run_lock(store, adapter):
        state = unfinished(store, adapter)
        if state is not None:
            log(f"resuming run {state['run_id']} (version {state['version']}, golden {state['golden']})")
            if golden != state["golden"] or (version and version != state["version"]):
                log("  (this --golden/--version is ignored: the run keeps its own; --abandon to change)")
        else:
            state = plan(store, agent, entry, extra_files(), golden, version)  # read only when planning
            log(f"run {state['run_id']}: {state['from']} -> {adapter}@{state['version']}")
        steps = {
            "snapshot": step_snapshot,
            "train": step_train(out_dir),
            "eval": step_eval(map_path, engine_factory),
            "promote": step_promote(map_path),
        }
        run_steps(store, state, steps, log)
    return state
