"""One decode step of the engine, variants side by side in one process.

    python benchmarks/decode_step.py            # needs the default base in $LOOM_STORE
    python benchmarks/decode_step.py --compare pack --dtype bfloat16 --steps 30
    python benchmarks/decode_step.py --compare lora --steps 30 --adapters 8 16 28

On a shared or throttled VM the speed drifts by 20% between runs, more than the
differences measured here, so the variants are timed in turns within one process
and each is given the same cache state. Two tables:

1. ``--compare pack``, base products in ``--dtype``: oneDNN-packed weights as the
   engine holds them (``loom.engine.linear``), the same with down_proj's choice flipped
   (``KEEP_DENSE``, decided by this table), and torch's plain GEMMs; one runner per
   variant on its own copy of the base, base-only rows. Workloads: a decode step at each
   of ``--batches`` and one prefill of ``--prefill-tokens`` (prompts of ``--context``
   tokens, as one scheduler step prefills them). Each cell: the median ms and the
   interquartile range over the turns; the last columns: the per-turn ratio of the
   other variants to the engine's packed form (median and interquartile range: pairing
   turns cancels most of the drift). In a dtype the CPU cannot pack (bf16 without
   native bf16), the packed variants fall back to the dense form and say so.
2. ``--compare lora``, LoRA deltas at U distinct adapters among the batch's rows: the
   dense path vs the gather (BGMV) path (``loom.engine.lora.DENSE_MAX_COLUMNS`` moved
   between them). Each variant runs 3 steps in a row and the last 2 count, because the
   dense path regathers its weights when the set of adapters changes.

Adapters are the engine benchmark's random rank-8 q/v adapters (created in the store
the first time ``benchmarks/engine.py`` runs; made here if missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as engine_bench

import loom.engine.linear as linear
import loom.engine.lora as lora
from loom.engine.kv_cache import KVCache
from loom.engine.runner import ModelRunner
from loom.models.loading import load_model, plan_load
from loom.store import Store


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def ms_cell(values: list[float]) -> str:
    q1, q2, q3 = (v * 1000 for v in quartiles(values))
    return f"{q2:.1f} [{q1:.1f}-{q3:.1f}]"


def ratio_cell(values: list[float]) -> str:
    q1, q2, q3 = quartiles(values)
    return f"{q2:.2f}x [{q1:.2f}-{q3:.2f}]"


class Bench:
    """The base, the prompts and a runner builder shared by both tables."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.store = Store()
        self.base_ref = plan_load(args.base, store=self.store, verify=False).base_ref
        gen = torch.Generator().manual_seed(0)
        rows = max([args.batch, *args.batches])
        self.prompts = [torch.randint(0, 40000, (args.context,), generator=gen).tolist() for _ in range(rows)]
        # the prefill workload: prompts of --context tokens adding up to --prefill-tokens
        sizes = [args.context] * (args.prefill_tokens // args.context)
        if args.prefill_tokens % args.context:
            sizes.append(args.prefill_tokens % args.context)
        self.prefill_prompts = [self.prompts[i % rows][:n] for i, n in enumerate(sizes)]

    def runner(self, pack: bool, slots: int = 1) -> tuple[ModelRunner, KVCache]:
        """A runner on a fresh copy of the base, every decode row's prompt prefilled; the
        prefill workload's slots come after them."""
        model = load_model(self.base_ref, store=self.store, device="cpu", dtype=self.args.dtype).model
        r = ModelRunner(model, slots, engine_bench.RANK, pack_weights=pack)
        rows = len(self.prompts)
        cache = r.new_cache(1024 * 2**20, 256, rows + len(self.prefill_prompts))
        r.prefill(cache, 0, self.prompts, [-1] * rows)
        return r, cache


def pack_variants(bench: Bench) -> dict[str, tuple[ModelRunner, KVCache]]:
    """The engine's packed form, the same with down_proj flipped, and plain GEMMs."""
    dtype = getattr(torch, bench.args.dtype)
    keep = linear.KEEP_DENSE.get(dtype, frozenset())
    flipped = keep ^ {"down"}
    down = "down dense" if "down" in keep else "down packed"
    other = "down packed" if "down" in keep else "down dense"
    variants = {f"engine: packed, {down}": bench.runner(True)}
    linear.KEEP_DENSE[dtype] = flipped
    try:
        variants[f"packed, {other}"] = bench.runner(True)
    finally:
        linear.KEEP_DENSE[dtype] = keep
    variants["unpacked"] = bench.runner(False)
    return variants


def compare_pack(bench: Bench) -> None:
    args = bench.args
    variants = pack_variants(bench)
    first = next(iter(variants.values()))[0]
    if first.head.packed is None:
        print(f"\nnote: {args.dtype} weights cannot be packed on this CPU: every variant runs dense")
    workloads: dict[str, Callable[[ModelRunner, KVCache], Any]] = {}
    for b in args.batches:
        tokens, positions = [5] * b, [args.context] * b
        workloads[f"decode, batch {b}"] = lambda r, c, t=tokens, p=positions: r.decode(c, t, p, [-1] * len(t))
    # the prefill writes slots after the decode rows: their cache stays as it is
    slot, prompts = len(bench.prompts), bench.prefill_prompts
    none = [-1] * len(prompts)
    workloads[f"prefill, {args.prefill_tokens} tokens"] = lambda r, c: r.prefill(c, slot, prompts, none)
    times: dict[tuple[str, str], list[float]] = {}
    for turn in range(args.steps + 1):  # the first turn warms up (oneDNN primitive creation)
        for work, fn in workloads.items():
            for name, (r, c) in variants.items():
                t = timed(lambda r=r, c=c, fn=fn: fn(r, c))
                if turn:
                    times.setdefault((work, name), []).append(t)
    names = list(variants)
    print(
        f"\n1. base products in {args.dtype}, {bench.base_ref}, context {args.context}, "
        f"{args.steps} turns, variants alternating; ms: median [interquartile range]\n"
    )
    cells = ["workload", *names, *(f"{n} / engine" for n in names[1:])]
    print("| " + " | ".join(cells) + " |\n|" + "---|" * len(cells))
    for work in workloads:
        base = times[(work, names[0])]
        cells = [work, *(ms_cell(times[(work, n)]) for n in names)]
        for n in names[1:]:
            cells.append(ratio_cell([o / e for o, e in zip(times[(work, n)], base, strict=True)]))
        print("| " + " | ".join(cells) + " |")


def compare_lora(bench: Bench) -> None:
    args, store, base_ref = bench.args, bench.store, bench.base_ref
    tokens, positions = [5] * args.batch, [args.context] * args.batch
    refs = engine_bench.make_adapters(store, base_ref, max(args.adapters))
    r, cache = bench.runner(True, slots=max(args.adapters))
    from loom.engine.adapters import AdapterCache
    from loom.engine.resolver import AdapterResolver

    adapters = AdapterCache(r, AdapterResolver(store, None), max(args.adapters), 2**31, engine_bench.RANK)
    slots = []
    for ref in refs[: max(args.adapters)]:
        resolved = adapters.resolver.resolve(ref)
        fut = adapters.request_load(resolved)
        assert fut is not None
        adapters.install(fut.result())
        slots.append(adapters.resident[resolved.key].slot)
    variants = {"base only": [-1] * args.batch}
    variants |= {f"U={u}": [slots[i % u] for i in range(args.batch)] for u in args.adapters}
    res: dict[tuple[str, str], list[float]] = {}
    default_columns = lora.DENSE_MAX_COLUMNS
    for _ in range(args.steps):
        for name, row_slots in variants.items():
            for path, columns in (("dense", 1 << 30), ("gather", 0)):
                lora.DENSE_MAX_COLUMNS = columns
                for k in range(3):
                    t = timed(lambda s=row_slots: r.decode(cache, tokens, positions, s))
                    if k:
                        res.setdefault((name, path), []).append(t)
    lora.DENSE_MAX_COLUMNS = default_columns
    print(f"\n2. LoRA deltas (rank {engine_bench.RANK} on q/v), ms per decode step at batch {args.batch}")
    print(f"{'rows use':<12}{'dense':>10}{'gather':>10}{'engine picks':>14}")
    for name in variants:
        u = int(name[2:]) if name.startswith("U=") else 0
        pick = "-" if not u else ("dense" if u * engine_bench.RANK <= default_columns else "gather")
        dense_ms, gather_ms = median_ms(res[(name, "dense")]), median_ms(res[(name, "gather")])
        print(f"{name:<12}{dense_ms:>10}{gather_ms:>10}{pick:>14}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=("pack", "lora", "both"), default="both")
    ap.add_argument("--base", default=None, help="base ref (default: the store's default base)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batch", type=int, default=32, help="rows of the LoRA table's decode step")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batches (pack)")
    ap.add_argument("--prefill-tokens", type=int, default=256, help="the pack table's prefill (CPU chunk)")
    ap.add_argument("--context", type=int, default=90, help="tokens already in each row's cache")
    ap.add_argument("--steps", type=int, default=20, help="turns per variant")
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 16, 28])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    bench = Bench(args)
    if args.compare in ("pack", "both"):
        compare_pack(bench)
    if args.compare in ("lora", "both"):
        compare_lora(bench)


if __name__ == "__main__":
    main()
