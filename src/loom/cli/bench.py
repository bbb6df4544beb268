"""``loom bench serve``: the concurrent-inference load tool against a running ``loom serve``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.table import Table

from loom.cli.output import console
from loom.errors import LoomError

app = typer.Typer(help="Benchmarks and load tools.", no_args_is_help=True)
_O = typer.Option
COLUMNS = (
    "concurrency",
    "requests",
    "ok",
    "rejected_429",
    "errors_5xx",
    "ttft_p50_s",
    "ttft_p95_s",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "tokens_per_s",
    "error_rate",
)


@contextlib.contextmanager
def _target(url: str | None, stub: bool) -> Iterator[str]:
    if not stub:
        if url is None:
            raise LoomError("give --url of a running 'loom serve' (or --stub to test the tool itself)")
        yield url.rstrip("/")
        return
    from loom.serve import ServeConfig, create_app
    from loom.serve.server import serve_in_thread

    with serve_in_thread(create_app(ServeConfig(stub=True, max_batch_size=16, max_seq_len=256))) as served:
        yield served


def _models(url: str, given: list[str] | None, key: str | None) -> list[str]:
    if given:
        return given
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    return [m["id"] for m in data]


@app.command("serve")
def bench_serve(
    url: str | None = _O(None, "--url", help="Base URL of a running server, e.g. http://127.0.0.1:8000."),
    models: list[str] | None = _O(
        None,
        "--model",
        help="Model/agent/adapter to include (repeat; default: every model the server lists).",
    ),
    concurrency: int = _O(8, "--concurrency", "-c", help="Concurrent clients."),
    requests: int = _O(4, "--requests", "-n", help="Requests per client."),
    max_tokens: int = _O(64, "--max-tokens"),
    ignore_eos: bool = _O(True, "--ignore-eos/--stop-at-eos", help="Same work per request."),
    ramp_up: float = _O(0.0, "--ramp-up", help="Seconds over which clients start (0: all at once)."),
    sweep: str | None = _O(None, "--sweep", help="Vary concurrency ('1,8,32') or pool size ('pool=1,4,8')."),
    csv_path: Path = _O(Path("bench-serve.csv"), "--csv", help="Per-request rows."),
    json_path: Path | None = _O(None, "--json", help="Write the summary (or sweep) as JSON."),
    plot: Path = _O(Path("bench-serve.png"), "--plot", help="With --sweep: the PNG plot."),
    api_key: str | None = _O(None, "--api-key", envvar="LOOM_API_KEY"),
    admin_key: str | None = _O(None, "--admin-key", envvar="LOOM_ADMIN_KEY"),
    stub: bool = _O(False, "--stub", help="Test mode: start a server on a deterministic tiny random model."),
) -> None:
    """N concurrent clients x M streamed chat requests over a mix of models; prints p50/p95/p99
    latency, time to first token, tokens/s and error rate, writes a CSV (and --json)."""
    from loom.serve.bench import BenchConfig, plot_sweep, run_bench, summarize, write_csv

    with _target(url, stub) as base:
        mix = _models(base, models, api_key)
        points: list[tuple[str, int]] = [("concurrency", concurrency)]
        if sweep:
            key, _, values = sweep.rpartition("=")
            key = {"": "concurrency", "pool": "pool_size"}.get(key, key)
            if key not in ("concurrency", "pool_size"):
                raise LoomError(f"--sweep {sweep!r}: give '1,8,32' (concurrency) or 'pool=1,4,8' (pool size)")
            try:
                points = [(key, int(v)) for v in values.split(",") if v.strip()]
            except ValueError:
                raise LoomError(f"--sweep {sweep!r}: values must be whole numbers, e.g. 1,8,32") from None
        summaries: list[dict[str, Any]] = []
        all_rows: list[Any] = []
        for key, value in points:
            pools = _make_pools(base, mix, value, admin_key) if key == "pool_size" else []
            try:
                cfg = BenchConfig(
                    base,
                    mix,
                    value if key == "concurrency" else concurrency,
                    requests,
                    max_tokens,
                    ignore_eos,
                    api_key=api_key,
                    ramp_up_s=ramp_up,
                )
                samples, wall = asyncio.run(run_bench(cfg))
            finally:
                _delete_pools(base, pools, admin_key)
            summary = summarize(samples, wall, cfg.concurrency)
            if key == "pool_size":
                summary["pool_size"] = value
            summaries.append(summary)
            all_rows += [(summary, s) for s in samples]
        write_csv([s for _, s in all_rows], csv_path)
        _print(summaries, mix)
        failed = next((s for _, s in all_rows if s.error), None)
        if failed is not None:
            console.print(f"[red]first error[/] ({failed.model}, HTTP {failed.status}): {failed.error}")
        console.print(f"per-request rows: {csv_path}")
        if json_path:
            json_path.write_text(json.dumps(summaries if sweep else summaries[0], indent=2))
            console.print(f"summary: {json_path}")
        if sweep:
            plot_sweep(summaries, points[0][0], plot)
            console.print(f"plot: {plot}")


def _admin(base: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)


def _make_pools(base: str, models: list[str], size: int, key: str | None) -> list[str]:
    made = []
    with _admin(base, key) as client:
        for model in models:
            r = client.post("/workers/pools", json={"adapter": model, "warm_size": size})
            if r.status_code == 201:
                made.append(r.json()["id"])
            elif r.status_code != 400:  # 400: the base itself has no pool
                raise LoomError(f"creating a pool for {model} failed ({r.status_code}): {r.text}")
    return made


def _delete_pools(base: str, pools: list[str], key: str | None) -> None:
    with _admin(base, key) as client:
        for pool in pools:
            client.delete(f"/workers/pool/{pool}")


def _print(summaries: list[dict[str, Any]], mix: list[str]) -> None:
    cols = (("pool_size",) if "pool_size" in summaries[0] else ()) + COLUMNS
    table = Table(*cols, title=f"loom bench serve: {', '.join(mix)}")
    for s in summaries:
        table.add_row(*("-" if s.get(c) is None else str(s[c]) for c in cols))
    console.print(table)
