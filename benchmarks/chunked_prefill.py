"""Chunked prefill: what a long prompt arriving mid-decode costs the streams already running.

    python benchmarks/chunked_prefill.py            # needs the default base in $LOOM_STORE
    python benchmarks/chunked_prefill.py --running 8 --long-tokens 1500 --chunks 0 512 256

Workload: ``--running`` chat requests (SNIPS dev) decode ``--new`` tokens each; once they
stream, one long request arrives (SQuAD dev passages end to end, ``--long-tokens`` tokens).
Each row of the table is the same workload with a different prefill budget per step
(``EngineConfig.max_prefill_tokens_per_step``; 0 = the whole prompt at once, as without
chunking), on one engine in one process, the rows in turns. Printed: the running
streams' inter-token latency (p50, p95, max: the stall the long prefill causes), the
long request's time to first token and the running rows' total time. The prefix cache is
off so every turn prefills the long prompt in full.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as engine_bench

from loom.engine import Engine, SamplingParams
from loom.models.loading import plan_load
from loom.store import Store

SQUAD = engine_bench.DATA.parents[1] / "squad_qa" / "dev.jsonl"


def long_prompt(engine: Engine, tokens: int, offset: int) -> list[int]:
    """SQuAD passages end to end (a different run of them per turn), cut to ``tokens``."""
    ids: list[int] = []
    lines = SQUAD.read_text().splitlines()
    for line in lines[offset:]:
        ids += engine.tokenize(json.loads(line)["context"] + "\n")
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def one_turn(
    engine: Engine, chunk: int, shorts: list[list[int]], long_ids: list[int], new: int
) -> dict[str, float]:
    engine.scheduler.limits.max_prefill_tokens_per_step = chunk or len(long_ids)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    started = time.monotonic()
    running = [engine.submit(p, params=params) for p in shorts]
    while any(r.sink.squeue.empty() for r in running):  # every short row is streaming
        time.sleep(0.001)
    long = engine.generate(long_ids, params=SamplingParams(max_new_tokens=4, ignore_eos=True))
    times: list[list[float]] = []
    for req in running:
        while not (chunk_out := req.sink.squeue.get(timeout=600)).finished:
            pass
        assert chunk_out.completion is not None and chunk_out.completion.error is None
        times.append(chunk_out.completion.token_times)
    itl = sorted(b - a for t in times for a, b in itertools.pairwise(t))
    return {
        "itl_p50_ms": statistics.median(itl) * 1000,
        "itl_p95_ms": engine_bench.pct(itl, 0.95) * 1000,
        "itl_max_ms": itl[-1] * 1000,
        "long_ttft_ms": (long.time_to_first_token_s or 0.0) * 1000,
        "running_total_s": max(t[-1] for t in times) - started,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", type=int, default=8, help="requests decoding when the long one arrives")
    ap.add_argument("--new", type=int, default=48, help="tokens each running request generates")
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256], help="0: no chunking")
    ap.add_argument("--turns", type=int, default=2, help="rounds over the chunk sizes")
    args = ap.parse_args()
    store = Store()
    base_ref = plan_load(None, store=store, verify=False).base_ref
    seq_len = args.long_tokens + 64
    engine = Engine.from_store(
        base_ref,
        device="cpu",
        store=store,
        max_batch_size=args.running + 1,
        max_seq_len=seq_len,
        kv_cache_mb=engine_bench.kv_budget_mb(base_ref, store, args.running + 1, seq_len, "float32"),
        prefix_cache_mb=0,
    )
    texts = [json.loads(x)["text"] for x in engine_bench.DATA.read_text().splitlines() if x][: args.running]
    shorts = [[{"role": "user", "content": t}] for t in texts]
    prompts = [engine.tokenize(s) for s in shorts]
    engine.generate(prompts[0], params=SamplingParams(max_new_tokens=2))  # warm-up
    results: dict[int, list[dict[str, float]]] = {c: [] for c in args.chunks}
    for turn in range(args.turns):
        for i, chunk in enumerate(args.chunks):
            long_ids = long_prompt(engine, args.long_tokens, offset=40 * (turn * len(args.chunks) + i))
            results[chunk].append(one_turn(engine, chunk, prompts, long_ids, args.new))
    engine.shutdown()
    keys = list(next(iter(results.values()))[0])
    print(
        f"\nchunked prefill: {args.running} running requests x {args.new} tokens, one {args.long_tokens}-"
        f"token prompt arriving mid-decode, {base_ref}, cpu float32 (median of {args.turns} turns)"
    )
    print(f"{'prefill budget/step':<22}" + "".join(f"{k:>17}" for k in keys))
    for chunk, runs in results.items():
        label = "whole prompt" if chunk == 0 else f"{chunk} tokens"
        print(f"{label:<22}" + "".join(f"{statistics.median(r[k] for r in runs):>17.1f}" for k in keys))


if __name__ == "__main__":
    main()
