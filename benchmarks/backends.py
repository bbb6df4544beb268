"""Backends benchmark: the same streaming workload through ``loom serve`` on Loom's engine and
on vLLM (``--backend vllm``: vLLM's CPU build here, behind Loom's gateway), side by side.

    python benchmarks/backends.py [--quick] [--repeat N] [--loom-dtypes float32,bfloat16,int8,int4]
                                  [--vllm-dtypes float32,bfloat16] [--json PATH]

Workload (as benchmarks/serve.py row C): SNIPS dev utterances as chat messages, 32 concurrent
streaming clients started together, exactly 64 new tokens each (eos ignored), greedy;
"mixed": 8 rank-8 adapters (bench-000N-<base>) round-robin; "base": the base alone.
Backends alternate (loom, vllm, loom, vllm...) so a noisy machine hits both alike.
Needs vLLM's environment (`make vllm`) or --vllm-python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from engine import DATA, RANK, make_adapters  # the same adapters and data as the engine benchmark

from loom.serve.bench import BenchConfig, run_bench, summarize
from loom.serve.server import free_port, wait_healthy
from loom.store import Store

CONCURRENCY, NEW = 32, 64
REPO = Path(__file__).resolve().parents[1]


def start(
    backend: str, adapters: list[str], dtype: str, vllm_python: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "loom", "serve", "--backend", backend, "--port", str(port),
        "--max-batch-size", str(CONCURRENCY), "--max-seq-len", "256", "--kv-cache-mb", "1024",
        "--max-adapters", "16", "--max-rank", str(RANK), "--dtype", dtype, "--log-level", "warning",
        "--request-log", "off", "--vllm-python", vllm_python,
        *[arg for a in adapters for arg in ("--preload", a)],
        *(["--allow-lossy"] if dtype in ("int8", "int4") else []),  # speed rows; quality is the guard's
    ]  # fmt: skip
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=600)
    return server, url


def measure(url: str, models: list[str], texts: list[str], rounds: int) -> dict[str, Any]:
    cfg = BenchConfig(
        url, models, concurrency=CONCURRENCY, requests_per_client=rounds, max_tokens=NEW, prompts=texts
    )
    samples, wall = asyncio.run(run_bench(cfg))
    s = summarize(samples, wall, CONCURRENCY)
    return {k: s[k] for k in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "requests")} | {
        "errors": s["requests"] - s["ok"]
    }


def backend_rows(
    backend: str, dtype: str, base_ref: str, adapters: list[str], texts: list[str], args: Any
) -> list[dict]:
    server, url = start(backend, adapters, dtype, args.vllm_python)
    try:
        measure(url, adapters, texts[:CONCURRENCY], 1)  # warm-up: first-step allocations, LoRA loads
        return [
            {"backend": backend, "dtype": dtype, "workload": name, **measure(url, models, texts, args.rounds)}
            for name, models in (("mixed, 8 adapters", adapters), ("base only", [base_ref]))
        ]
    finally:
        server.terminate()
        server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1 round of 32 instead of 3")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the backends this many times")
    parser.add_argument(
        "--loom-dtypes", default="float32", help="comma-separated: float32,bfloat16,int8,int4"
    )
    parser.add_argument("--vllm-dtypes", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.rounds = 1 if args.quick else 3
    store = Store()
    base_ref = store.resolve(store.default_base() or "smollm2-135m-instruct").ref
    adapters = make_adapters(store, base_ref, 8)
    texts = [json.loads(x)["text"] for x in DATA.read_text().splitlines() if x]
    rows = []
    runs = [("loom", d) for d in args.loom_dtypes.split(",")] + [
        ("vllm", d) for d in args.vllm_dtypes.split(",")
    ]
    for _ in range(args.repeat):
        for backend, dtype in runs:
            rows += backend_rows(backend, dtype, base_ref, adapters, texts, args)
    print(f"\n{CONCURRENCY} streams x {NEW} tokens, {args.rounds} round(s) per row")
    print("| backend | dtype | workload | tok/s | TTFT p50 (ms) | TTFT p95 (ms) | requests | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['dtype']} | {r['workload']} | {r['tokens_per_s']:.1f} | "
            f"{r['ttft_p50_s'] * 1000:.0f} | {r['ttft_p95_s'] * 1000:.0f} | {r['requests']} | {r['errors']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
