"""Retraining on the tiny random Mistral: whether one is due, the feedback round trip (posted over
HTTP -> exported -> a retrained, evaluated and gated candidate whose snapshot holds the
correction), and a `loom retrain run` killed with SIGKILL at random points that, run again,
finishes with no duplicated or lost versions and a consistent promotion log."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import tiny_engine, train_tiny_intent

from loom.agents.spec import load_map_file
from loom.engine import Engine
from loom.errors import LoomError
from loom.evals.golden import import_golden
from loom.evals.pipeline import exported_feedback, retrain
from loom.evals.promotion import read_log
from loom.evals.results import list_evals
from loom.evals.retrain import STEPS, check, run_lock, runs, unfinished
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store
from loom.store.importers import import_hf_dir

ROWS = [
    {"id": f"r{i}-{w}", "text": f"{w} {i}", "label": lab}
    for i in range(4)
    for w, lab in (("ask", "A"), ("buy", "B"), ("call", "C"))
]
OPEN_GATES = {"accuracy": None, "citation_presence": None, "refusal_accuracy": None, "p95_latency_s": None}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _engine(store: Store) -> Engine:
    engine: Engine = tiny_engine(store, max_batch_size=8, max_seq_len=256, kv_cache_mb=16)
    return engine


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A store root with tiny@v1, intent@v1 (promoted, trained by loom train on ROWS) and the
    golden set intent-golden; each test works on its own copy."""
    root = tmp_path_factory.mktemp("retrain")
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    store.set_default_base("tiny")
    train_tiny_intent(store, ROWS, root, version="v1", model_name_or_path="tiny@v1", max_steps=1)
    golden = [{"id": r["id"], "input": {"text": r["text"]}, "expected": {"intent": r["label"]}} for r in ROWS]
    import_golden(store, _jsonl(root / "golden.jsonl", golden[:6]), "intent-golden")
    return root


@pytest.fixture
def work(trained: Path, tmp_path: Path) -> tuple[Store, Path]:
    shutil.copytree(trained / "store", tmp_path / "store")
    agents = {"intent": {"adapter": "intent", "generation": {"max_tokens": 8}, "gates": OPEN_GATES}}
    path = tmp_path / "AGENT_MODEL_MAP.json"
    path.write_text(json.dumps({"agents": agents}))
    return Store(tmp_path / "store"), path


def test_check_says_whether_and_which_retrain_is_due(work: tuple[Store, Path], tmp_path: Path) -> None:
    store, path = work
    entry = load_map_file(path).agents["intent"]
    found = check(store, "intent", entry)
    assert (found.rows_then, found.rows_now, found.new_rows, found.due, found.kind) == (
        12,
        12,
        0,
        False,
        "none",
    )
    extra = _jsonl(
        tmp_path / "new.jsonl", [{"id": f"n{i}", "text": f"x {i}", "label": "A"} for i in range(3)]
    )
    found = check(store, "intent", entry, extra_files=[extra])
    assert (found.new_rows, found.new_share, found.due, found.kind) == (3, 0.2, True, "continue")
    created = store.resolve("intent").manifest.created_at
    old = check(store, "intent", entry, now=created + timedelta(days=100))
    assert old.kind == "full" and "100 days old" in old.reasons[0]
    assert check(store, "intent", entry, feedback=25).due


def test_feedback_round_trip_builds_a_gated_candidate_that_learned_the_correction(
    work: tuple[Store, Path], tmp_path: Path
) -> None:
    store, path = work
    log = tmp_path / "requests.sqlite"
    engine = Engine.from_store(
        "tiny", device="cpu", store=store, max_batch_size=8, max_seq_len=256, kv_cache_mb=16
    )
    try:
        app = create_app(ServeConfig(agents_file=path, request_log=log), engine=engine)
        with serve_in_thread(app) as url:
            r = httpx.post(f"{url}/v1/agents/intent/run", json={"input": {"text": "buy a kite"}}, timeout=60)
            assert r.status_code == 200, r.text
            rid = r.json()["response_id"]
            fb = {"response_id": rid, "rating": -1, "corrected_answer": '{"intent": "B"}'}
            assert httpx.post(f"{url}/v1/feedback", json=fb, timeout=60).status_code == 200
    finally:
        engine.shutdown()
    entry = load_map_file(path).agents["intent"]
    lines: list[str] = []
    state = retrain(
        store,
        "intent",
        entry=entry,
        golden="intent-golden",
        extra_files=lambda: exported_feedback(log, "intent", store, tmp_path / "out" / "fb.jsonl"),
        out_dir=tmp_path / "out",
        map_path=path,
        engine_factory=lambda: Engine.from_store(
            "tiny", device="cpu", store=store, max_batch_size=8, kv_cache_mb=16
        ),
        log=lines.append,
    )
    new = f"intent@{state['version']}"
    assert state["status"] == "done" and state["steps"]["train"]["version"] == new
    snapshot = store.resolve(state["steps"]["snapshot"]["snapshot"])
    ids = store.backend.read_bytes(f"{snapshot.rel}/row_ids.txt").decode().split()
    assert rid in ids and len(ids) == len(ROWS) + 1  # the correction, by its response id
    summary = store.resolve(new).manifest.training_summary or {}
    assert summary["data"]["snapshot"] == snapshot.ref  # trained on exactly that snapshot
    (record,) = list_evals(store, new)
    assert record.eval_id == state["steps"]["eval"]["eval_id"]
    events = [e for e in read_log(store, store.find("intent")) if e.ref == new]
    assert [e.action for e in events] == ["promote"] and store.resolve("intent").version == state["version"]
    # the next round reads the original files (not the frozen copies it trained on): a row
    # added to one of them since is new
    found = check(store, "intent", entry)
    assert (found.promoted, found.rows_then, found.rows_now, found.new_rows) == (new, 13, 13, 0)
    with open(tmp_path / "out" / "fb.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "late", "text": "call mom", "label": "C"}) + "\n")
    assert check(store, "intent", entry).new_rows == 1
    again = retrain(
        store, "intent", entry=entry, golden="intent-golden",
        extra_files=lambda: exported_feedback(log, "intent", store, tmp_path / "out" / "fb.jsonl"),
        out_dir=tmp_path / "out", map_path=path, engine_factory=lambda: _engine(store), log=lines.append,
    )  # fmt: skip
    assert again["status"] == "done" and again["steps"]["snapshot"] == state["steps"]["snapshot"]


def test_strict_gates_refuse_the_candidate_and_the_refusal_is_logged(work: tuple[Store, Path]) -> None:
    store, path = work
    doc = json.loads(path.read_text())
    doc["agents"]["intent"]["gates"] = {**OPEN_GATES, "accuracy": 1.0}
    path.write_text(json.dumps(doc))
    entry = load_map_file(path).agents["intent"]
    state = retrain(
        store, "intent", entry=entry, golden="intent-golden", extra_files=list, out_dir=path.parent / "out",
        map_path=path, engine_factory=lambda: _engine(store), log=lambda _line: None,
    )  # fmt: skip
    assert state["steps"]["promote"]["promoted"] is False
    assert [g["name"] for g in state["steps"]["promote"]["failed_gates"]] == ["accuracy"]
    assert store.resolve("intent").version == "v1"  # current did not move
    new = f"intent@{state['version']}"
    assert [e.action for e in read_log(store, store.find("intent")) if e.ref == new] == ["refused"]


def test_one_run_at_a_time_and_a_wrong_golden_set_fails_before_training(work: tuple[Store, Path]) -> None:
    store, path = work
    entry = load_map_file(path).agents["intent"]
    kw: dict[str, Any] = dict(
        entry=entry, extra_files=list, out_dir=path.parent / "out", map_path=path,
        engine_factory=lambda: _engine(store), log=lambda _line: None,
    )  # fmt: skip
    with pytest.raises(LoomError, match="intnet-golden"):
        retrain(store, "intent", golden="intnet-golden", **kw)
    assert runs(store, "intent") == []  # nothing planned, nothing to resume
    with run_lock(store, "intent"), pytest.raises(LoomError, match="another 'loom retrain run' of intent"):
        retrain(store, "intent", golden="intent-golden", **kw)
    assert runs(store, "intent") == []


def _run(env: dict[str, str], path: Path, out: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "loom", "retrain", "run", "intent", "--map", str(path), "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_after(proc: subprocess.Popen[bytes], marker: str, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after it prints a line starting with ``marker``; False
    when it ended first."""
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        if raw.decode(errors="replace").startswith(marker):
            time.sleep(delay)
            break
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_a_retrain_killed_at_random_points_finishes_once_when_run_again(
    work: tuple[Store, Path], tmp_path: Path
) -> None:
    store, path = work
    env = {**os.environ, "LOOM_STORE": str(store.url), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(15)
    kills = 0
    for _attempt in range(8):  # kill each run at a random moment of a step it is about to do
        if any(r["status"] == "done" for r in runs(store, "intent")):
            break
        state = unfinished(store, "intent")
        todo = [s for s in STEPS if state is None or s not in state["steps"]]
        if not _kill_after(
            _run(env, path, tmp_path / "out"), f"{rng.choice(todo[:2])} ...", rng.uniform(0, 1.5)
        ):
            break
        kills += 1
    if not any(r["status"] == "done" for r in runs(store, "intent")):
        proc = _run(env, path, tmp_path / "out")  # and once to the end
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output.decode()[-3000:]
    assert kills >= 3
    all_runs = runs(store, "intent")
    assert len(all_runs) == 1, json.dumps(all_runs, indent=1)
    (state,) = all_runs  # one run, resumed, never planned twice
    assert state["status"] == "done"
    artifact = store.find("intent")
    assert store.versions(artifact) == sorted(["v1", state["version"]])  # no duplicate, none lost
    new = f"intent@{state['version']}"
    assert len(list_evals(store, new)) == 1
    events = [e for e in read_log(store, artifact) if e.ref == new]
    assert [e.action for e in events] == ["promote"]  # logged once
    assert store.resolve("intent").version == state["version"]
