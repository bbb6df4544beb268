"""Serving benchmark: the engine called directly vs. the same mix through ``loom serve`` over HTTP.

    python benchmarks/serve.py [--quick] [--json PATH]

Workload (the engine benchmark's row 5 mix): SNIPS dev utterances as chat messages, 8 rank-8
adapters (bench-0000-<base>..bench-0007-<base>, created like benchmarks/engine.py does)
assigned round-robin, exactly 64 new tokens per request (eos ignored), greedy, on the store's default base.

Rows:
  A. engine, called in-process: waves of 32 requests submitted at once (generate_many)
  B. loom serve + loom bench serve, 1 client (single stream), streamed
  C. loom serve + loom bench serve, 32 concurrent streaming clients, closed loop, started together
     (equal lengths keep them in lock-step: every round is one burst of 32 prompts)
  D. as C, the clients' starts spread over one request's duration (--ramp-up): staggered arrivals;
     its time to first token is taken after the first round (the steady state)
Checks: p95 time to first token of C and D within 3x B's; C's tokens/s within 15% of A's.
The server runs in its own process (its engine thread owns the cores); the client is this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from engine import DATA, RANK, make_adapters, pct  # the same adapters and data as the engine benchmark

from loom.serve.bench import BenchConfig, run_bench, summarize
from loom.serve.server import free_port, wait_healthy
from loom.store import Store

CONCURRENCY, NEW = 32, 64


def engine_row(base_ref: str, adapters: list[str], texts: list[str], rounds: int) -> dict[str, Any]:
    from loom.engine import Engine, SamplingParams

    engine = Engine.from_store(
        base_ref,
        device="cpu",
        max_batch_size=CONCURRENCY,
        max_seq_len=256,
        kv_cache_mb=1024,
        max_adapters=16,
        max_rank=RANK,
    )
    for ref in adapters:
        engine.load_adapter(ref)
    engine.generate("Hello", params=SamplingParams(max_new_tokens=2))  # warm-up
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    ttft: list[float] = []
    tokens = 0
    start = time.monotonic()
    for r in range(rounds):
        batch = [
            ([{"role": "user", "content": texts[(r * CONCURRENCY + i) % len(texts)]}], adapters[i % 8])
            for i in range(CONCURRENCY)
        ]
        done = engine.generate_many(batch, params=params)  # type: ignore[arg-type]
        ttft += [d.time_to_first_token_s or 0.0 for d in done]
        tokens += sum(len(d.token_ids) for d in done)
    wall = time.monotonic() - start
    engine.shutdown()
    return {
        "row": f"A. engine in-process, {CONCURRENCY} at once x {rounds}",
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "latency_p95_s": None,
        "requests": len(ttft),
        "errors": 0,
    }


def server_rows(adapters: list[str], texts: list[str], rounds: int) -> tuple[list[dict[str, Any]], dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "loom",
        "serve",
        "--port",
        str(port),
        "--max-batch-size",
        str(CONCURRENCY),
        "--max-seq-len",
        "256",
        "--kv-cache-mb",
        "1024",
        "--max-adapters",
        "16",
        "--max-rank",
        str(RANK),
        "--log-level",
        "warning",
        *[arg for a in adapters for arg in ("--preload", a)],
    ]
    server = subprocess.Popen(cmd)
    rows = []
    try:
        wait_healthy(url, timeout=300)
        models = list(adapters)  # name@version: the bench adapters have no current alias
        plans = [
            ("B. loom serve, 1 stream", 1, 8, 0.0),
            (f"C. loom serve, {CONCURRENCY} streams, started together", CONCURRENCY, rounds, 0.0),
            (f"D. loom serve, {CONCURRENCY} streams, staggered", CONCURRENCY, rounds + 1, -1.0),
        ]
        for name, clients, n, ramp in plans:
            if ramp < 0:  # stagger the starts over one request's duration at this load (row C)
                ramp = rows[-1]["latency_p50_s"]
                name += f" over {ramp:.0f} s"
            cfg = BenchConfig(
                url,
                models,
                concurrency=clients,
                requests_per_client=n,
                max_tokens=NEW,
                prompts=texts,
                ramp_up_s=ramp,
            )
            samples, wall = asyncio.run(run_bench(cfg))
            s = summarize(samples, wall, clients)
            if ramp:  # time to first token in the steady state: the first round ramps the batch up
                s |= {
                    k: v
                    for k, v in summarize([x for x in samples if x.index > 0], wall, clients).items()
                    if k.startswith("ttft")
                }
            rows.append(
                {
                    "row": name,
                    "tokens_per_s": s["tokens_per_s"],
                    "ttft_p50_s": s["ttft_p50_s"],
                    "ttft_p95_s": s["ttft_p95_s"],
                    "latency_p50_s": s["latency_p50_s"],
                    "latency_p95_s": s["latency_p95_s"],
                    "requests": s["requests"],
                    "errors": s["requests"] - s["ok"],
                }
            )
        import httpx

        info = httpx.get(f"{url}/info").json()
        with open(f"/proc/{server.pid}/status") as fh:
            peak = next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmHWM"))
        memory = {
            "server_peak_rss_mb": peak,
            "plan_total_mb": info["plan"]["total_mb"],
            "plan_budget_mb": info["plan"]["budget_mb"],
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows, memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 waves instead of 4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rounds = 2 if args.quick else 4
    store = Store()
    base_ref = store.resolve(store.default_base() or "smollm2-135m-instruct").ref
    adapters = make_adapters(store, base_ref, 8)
    texts = [json.loads(x)["text"] for x in DATA.read_text().splitlines() if x]
    rows = [engine_row(base_ref, adapters, texts, rounds)]
    served, memory = server_rows(adapters, texts, rounds)
    rows += served
    print("\n| row | tok/s | TTFT p50 (ms) | TTFT p95 (ms) | latency p95 (s) | requests | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lat = f"{r['latency_p95_s']:.2f}" if r["latency_p95_s"] is not None else "-"
        print(
            f"| {r['row']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s'] * 1000:.0f} | "
            f"{r['ttft_p95_s'] * 1000:.0f} | {lat} | {r['requests']} | {r['errors']} |"
        )
    a, b, c, d = rows
    ttft_ratio = {"C": c["ttft_p95_s"] / b["ttft_p95_s"], "D": d["ttft_p95_s"] / b["ttft_p95_s"]}
    tput_ratio = c["tokens_per_s"] / a["tokens_per_s"]
    print(f"\np95 TTFT vs one stream (target <= 3): C {ttft_ratio['C']:.2f}x, D {ttft_ratio['D']:.2f}x")
    print(f"C/A tokens/s: {tput_ratio:.2f} (target >= 0.85)")
    print(
        f"server peak RSS {memory['server_peak_rss_mb']} MB; plan {memory['plan_total_mb']} MB of "
        f"{memory['plan_budget_mb']} MB budget"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "memory": memory, "ttft_ratio": ttft_ratio, "throughput_ratio": tput_ratio},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
