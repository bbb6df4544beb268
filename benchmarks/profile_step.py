"""Where a decode step's time goes: the whole engine loop under torch's profiler.

    python benchmarks/profile_step.py                        # batch 1, 8, 32; base-only and 8 adapters
    python benchmarks/profile_step.py --dtype bfloat16 --batches 32 --adapters 8 --top 25

The engine runs as it serves (its own thread, the scheduler, sampling, detokenising,
streaming); the profiler is started and stopped *on the engine thread* through its control
queue, so only steady decode steps of a full batch are recorded. Each row of the table
splits the step's wall time into

* GEMM: the base's and LoRA's matrix products (self time of mm/addmm/bmm/oneDNN linear/
  packed int kernels);
* attention: scaled_dot_product_attention and what it calls;
* other ops: every other torch op's self time (norms, rotary, SiLU, copies, index ops,
  sampling);
* outside ops: the rest of the wall time: Python in the runner, scheduler, sampler and
  output processing, and the profiler's own cost per op (so an upper bound of Python work).

``--top N`` prints the N costliest non-GEMM ops per row, the list to cut from.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as engine_bench

from loom.engine import Engine, SamplingParams
from loom.models.loading import plan_load
from loom.store import Store

GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "mkldnn::_linear_pointwise",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
}


def on_engine_thread(engine: Engine, fn: Any) -> None:
    """Run ``fn`` on the engine thread between two steps and wait for it."""
    done = threading.Event()

    def call() -> None:
        fn()
        done.set()

    engine.scheduler.control.put(call)
    done.wait()


def wait_for(predicate: Any, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise SystemExit("timed out waiting for the engine")
        time.sleep(0.01)


def profile_batch(
    engine: Engine, refs: list[str | None], batch: int, steps: int, context: int
) -> dict[str, Any]:
    """Profile ``steps`` decode steps of ``batch`` running rows; return the split."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_new_tokens=steps * 4 + 64, ignore_eos=True)
    reqs = [
        engine.submit(
            torch.randint(100, 40000, (context,), generator=gen).tolist(),
            adapter=refs[i % len(refs)],
            params=params,
        )
        for i in range(batch)
    ]
    sched = engine.scheduler
    wait_for(lambda: len(sched.running) == batch and not sched.waiting and sched.partial is None)
    start_step = sched.steps + 3  # a few steps in: caches warm, LoRA gathers settled
    wait_for(lambda: sched.steps >= start_step)
    prof = profile(activities=[ProfilerActivity.CPU])
    marks: dict[str, float] = {}

    def start() -> None:
        prof.start()
        marks["t0"], marks["s0"] = time.perf_counter(), sched.steps

    def stop() -> None:
        marks["t1"], marks["s1"] = time.perf_counter(), sched.steps
        prof.stop()

    on_engine_thread(engine, start)
    wait_for(lambda: sched.steps >= marks["s0"] + steps)
    on_engine_thread(engine, stop)
    for req in reqs:
        engine.cancel(req.id)
    wait_for(lambda: not sched.running and not sched.waiting)
    n = marks["s1"] - marks["s0"]
    return split(prof, (marks["t1"] - marks["t0"]) * 1000 / n, n)


def split(prof: Any, step_ms: float, n: float) -> dict[str, Any]:
    gemm = attn = other = 0.0
    others: dict[str, float] = {}
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1000 / n
        if ev.key in GEMM_OPS:
            gemm += ms
        elif "scaled_dot_product" in ev.key or "flash_attention" in ev.key:
            attn += ms
        elif ev.key.startswith(("aten::", "mkldnn::", "quantized::")):
            other += ms
            others[ev.key] = ms
    outside = max(0.0, step_ms - gemm - attn - other)
    top = sorted(others.items(), key=lambda kv: -kv[1])
    return {"step": step_ms, "gemm": gemm, "attn": attn, "other": other, "outside": outside, "top": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--adapters", type=int, nargs="+", default=[0, 8], help="distinct adapters among the rows (0: base)"
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=90, help="prompt tokens per row")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    store = Store()
    base_ref = plan_load(None, store=store, verify=False).base_ref
    refs_all = engine_bench.make_adapters(store, base_ref, max(args.adapters))
    engine = Engine.from_store(
        base_ref, store=store, dtype=args.dtype, max_batch_size=max(args.batches), max_rank=engine_bench.RANK,
        max_seq_len=args.context + args.steps * 4 + 80, prefix_cache_mb=0,
    )  # fmt: skip
    rows = []
    for u in args.adapters:
        refs: list[str | None] = list(refs_all[:u]) if u else [None]
        for b in args.batches:
            rows.append((u, b, profile_batch(engine, refs, b, args.steps, args.context)))
    print(
        f"\ndecode step, {base_ref}, {args.dtype}, {torch.get_num_threads()} threads, context {args.context}"
    )
    print(f"{'adapters':>8}{'batch':>6}{'ms/step':>9}{'GEMM':>8}{'attn':>8}{'other':>8}{'outside':>9}")
    for u, b, r in rows:
        print(
            f"{u:>8}{b:>6}{r['step']:>9.1f}{r['gemm']:>8.1f}{r['attn']:>8.1f}{r['other']:>8.1f}{r['outside']:>9.1f}"
        )
    for u, b, r in rows:
        print(f"\ncostliest non-GEMM ops, adapters {u}, batch {b} (ms per step)")
        for key, ms in r["top"][: args.top]:
            print(f"  {key:<44}{ms:>8.2f}")
    engine.shutdown()


if __name__ == "__main__":
    main()
