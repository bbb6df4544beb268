"""The serving plan (--dry-run, over-commit refusal), the stub mode, start-up health, the agent map,
``loom bench serve`` and a bounded load test at 10x the batch limit."""

from __future__ import annotations

import asyncio
import json
import resource
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loom.agents import load_map_file
from loom.cli.main import app
from loom.errors import LoomError
from loom.serve import ServeConfig, create_app
from loom.serve.bench import BenchConfig, run_bench, summarize
from loom.serve.plan import plan_from_store
from loom.serve.server import serve_in_thread, wait_healthy
from loom.store import Store

runner = CliRunner()


def test_dry_run_prints_the_plan_from_manifests(engine_store: Store) -> None:
    args = ["serve", "--dry-run", "--json", "--base", "tiny", "--preload", "qv4", "--device", "cpu"]
    result = runner.invoke(app, args, env={"LOOM_STORE": engine_store.url})
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["base_ref"] == "tiny@v1" and plan["variant"] == "float32" and plan["preload"] == ["qv4"]
    assert plan["total_mb"] <= plan["budget_mb"] and plan["kv_sequences"] >= plan["max_batch_size"]
    assert plan["max_prefill_tokens"] == 256  # CPU default: long prompts go in chunks of it
    chunked = runner.invoke(app, [*args, "--max-prefill-tokens", "64"], env={"LOOM_STORE": engine_store.url})
    plan64 = json.loads(chunked.output)
    assert plan64["max_prefill_tokens"] == 64 and plan64["activations_mb"] <= plan["activations_mb"]
    assert plan_from_store(ServeConfig(base="tiny", device="cpu", max_prefill_tokens=64), engine_store, [])
    bad = runner.invoke(app, [*args, "--max-prefill-tokens", "0"], env={"LOOM_STORE": engine_store.url})
    assert bad.exit_code == 2 and "--max-prefill-tokens 0: give a positive" in bad.output
    table = runner.invoke(app, ["serve", "--dry-run", "--base", "tiny"], env={"LOOM_STORE": engine_store.url})
    assert table.exit_code == 0 and "dry run, nothing loaded" in table.output


def test_plan_refuses_over_commit_and_says_by_how_much(engine_store: Store) -> None:
    cfg = ServeConfig(base="tiny", device="cpu", memory_mb=50, kv_cache_mb=64)
    with pytest.raises(LoomError, match=r"over by \d+ MiB"):
        plan_from_store(cfg, engine_store, [])
    result = runner.invoke(
        app,
        ["serve", "--dry-run", "--base", "tiny", "--memory-mb", "50", "--kv-cache-mb", "64"],
        env={"LOOM_STORE": engine_store.url},
    )
    assert result.exit_code == 2 and "over by" in result.output
    fits = plan_from_store(ServeConfig(base="tiny", device="cpu", memory_mb=800), engine_store, [])
    assert 0 < fits.prefix_cache_mb <= 256 and fits.total_mb <= 800  # the default takes what is left
    asked = ServeConfig(base="tiny", device="cpu", memory_mb=800, prefix_cache_mb=fits.prefix_cache_mb + 300)
    with pytest.raises(LoomError, match=r"prefix cache \d+.* over by \d+ MiB"):
        plan_from_store(asked, engine_store, [])
    lowered = plan_from_store(
        ServeConfig(base="tiny", device="cpu", memory_mb=520, max_seq_len=256), engine_store, []
    )
    assert lowered.max_batch_size <= 32 and lowered.total_mb <= 520
    with pytest.raises(LoomError, match="no-such"):
        plan_from_store(ServeConfig(base="tiny", device="cpu"), engine_store, ["no-such"])


def test_agent_map_errors_name_the_agent(tmp_path: Path) -> None:
    bad = tmp_path / "agents.yaml"
    bad.write_text("agents:\n  intent:\n    adapter: ../../etc\n")
    with pytest.raises(LoomError, match=r"agents.yaml: agent 'intent', field adapter: .*store ref"):
        load_map_file(bad)
    bad.write_text("agents:\n  intent:\n    adaptr: x\n")
    with pytest.raises(LoomError, match=r"agent 'intent', field adaptr: unknown field"):
        load_map_file(bad)
    with pytest.raises(LoomError, match="does not exist"):
        load_map_file(tmp_path / "missing.yaml")


def test_health_is_503_until_loaded_then_warm_pools_from_the_agent_map(
    engine_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import loom.serve.app as serve_app

    release = threading.Event()
    real_build = serve_app.build_engine

    def slow_build(*args: Any) -> Any:  # hold the start-up until the test has seen the 503s
        release.wait(30)
        return real_build(*args)

    monkeypatch.setattr(serve_app, "build_engine", slow_build)
    agents = tmp_path / "agents.yaml"
    agents.write_text("agents:\n  helper:\n    adapter: o2\n    warm: 2\n")
    cfg = ServeConfig(base="tiny", device="cpu", agents_file=agents, max_batch_size=4, max_seq_len=128)
    with serve_in_thread(create_app(cfg, store=engine_store), healthy=False) as url:
        loading = httpx.get(f"{url}/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(f"{url}/generate", json={"prompt": "x"})
        assert early.status_code == 503 and early.headers["retry-after"]
        assert early.json()["error"]["type"] == "service_unavailable"
        release.set()
        wait_healthy(url, timeout=60)
        pools = httpx.get(f"{url}/workers/pools").json()["pools"]
        assert [(p["model"], p["adapter"], p["warm_size"]) for p in pools] == [("helper", "o2@v1", 2)]
        info = httpx.get(f"{url}/info").json()
        assert "o2@v1" in info["resident_adapters"] and info["plan"]["base_ref"] == "tiny@v1"
        r = httpx.post(f"{url}/generate", json={"prompt": "play", "agent": "helper", "max_tokens": 3})
        assert r.json()["model_version"] == "o2@v1"


def test_failed_start_reports_why(engine_store: Store) -> None:
    cfg = ServeConfig(base="no-such-base", device="cpu")
    with serve_in_thread(create_app(cfg, store=engine_store), healthy=False) as url:
        with pytest.raises(LoomError, match=r"failed to start.*no-such-base"):
            wait_healthy(url, timeout=30)
        assert httpx.get(f"{url}/health").status_code == 503


def test_bench_serve_stub_writes_csv_json_and_sweep_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "serve",
        "--stub",
        "-c",
        "3",
        "-n",
        "2",
        "--max-tokens",
        "8",
        "--csv",
        str(tmp_path / "rows.csv"),
        "--json",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["requests"] == 6 and summary["ok"] == 6 and summary["error_rate"] == 0
    assert summary["completion_tokens"] == 48 and summary["tokens_per_s"] > 0
    assert summary["ttft_p50_s"] <= summary["latency_p50_s"]
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 7
    sweep = runner.invoke(app, [*args, "--sweep", "1,4", "--plot", str(tmp_path / "sweep.png")])
    assert sweep.exit_code == 0, sweep.output
    assert [s["concurrency"] for s in json.loads(out.read_text())] == [1, 4]
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    bad = runner.invoke(app, ["bench", "serve", "--stub", "--sweep", "pool=a"])
    assert bad.exit_code == 2 and "whole numbers" in bad.output
    assert runner.invoke(app, ["bench", "serve"]).exit_code == 2  # no --url, no --stub


def test_load_at_ten_times_the_batch_limit(engine_store: Store) -> None:
    """40 concurrent clients against a batch of 4 and a queue of 8: every request is answered or
    refused with 429, none fails, and memory stays inside the plan's budget."""
    cfg = ServeConfig(
        base="tiny", device="cpu", max_batch_size=4, max_seq_len=128, max_queue=8, memory_mb=1000
    )
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with serve_in_thread(create_app(cfg, store=engine_store)) as url:
        models = ["tiny", "qv4", "all8", "o2"]
        samples, wall = asyncio.run(
            run_bench(
                BenchConfig(url, models, concurrency=40, requests_per_client=3, max_tokens=24, timeout_s=120)
            )
        )
        assert wall < 120
        summary = summarize(samples, wall, 40)
        assert summary["errors_5xx"] == 0 and all(s.status in (200, 429) for s in samples), summary
        assert summary["ok"] >= 12 and summary["ok"] + summary["rejected_429"] == 120
        assert all(s.completion_tokens == 24 for s in samples if s.status == 200)
        assert httpx.get(f"{url}/health").status_code == 200  # still up
        plan = httpx.get(f"{url}/info").json()["plan"]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
    assert plan["total_mb"] <= 1000 and grown <= plan["total_mb"]
