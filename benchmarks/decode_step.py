"""One decode step of the engine, variants side by side in one process.

    python benchmarks/decode_step.py            # needs the default base in $LOOM_STORE
    python benchmarks/decode_step.py --steps 30 --adapters 8 16 28

On a shared or throttled VM the speed drifts by 20% between runs, more than the
differences measured here, so the variants are timed in turns within one process
and each is given the same cache state. Two tables:

1. base products: oneDNN-packed weights vs torch's plain GEMMs (two runners on two
   copies of the base, base-only rows);
2. LoRA deltas at U distinct adapters among the batch's rows: the dense path vs the
   gather (BGMV) path (``loom.engine.lora.DENSE_MAX_COLUMNS`` moved between them).
   Each variant runs 3 steps in a row and the last 2 count, because the dense path
   regathers its weights when the set of adapters changes.

Adapters are the engine benchmark's random rank-8 q/v adapters (created in the store
the first time ``benchmarks/engine.py`` runs; made here if missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as engine_bench

import loom.engine.lora as lora
from loom.engine.runner import ModelRunner
from loom.models.loading import load_model, plan_load
from loom.store import Store


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=90, help="tokens already in each row's cache")
    ap.add_argument("--steps", type=int, default=20, help="turns per variant")
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 16, 28])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    store = Store()
    base_ref = plan_load(None, store=store, verify=False).base_ref
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 40000, (args.context,), generator=gen).tolist() for _ in range(args.batch)]
    tokens, positions = [5] * args.batch, [args.context] * args.batch

    def runner(pack: bool, slots: int = 1) -> tuple[ModelRunner, Any]:
        model = load_model(base_ref, store=store, device="cpu", dtype="float32").model
        r = ModelRunner(model, slots, engine_bench.RANK, pack_weights=pack)
        cache = r.new_cache(1024 * 2**20, 256, args.batch)
        r.prefill(cache, 0, prompts, [-1] * args.batch)
        return r, cache

    packed, dense = runner(True), runner(False)
    times: dict[str, list[float]] = {"oneDNN-packed": [], "plain GEMM": []}
    for _ in range(args.steps + 1):
        for name, (r, c) in (("oneDNN-packed", packed), ("plain GEMM", dense)):
            times[name].append(timed(lambda r=r, c=c: r.decode(c, tokens, positions, [-1] * args.batch)))
    print(f"\n1. base products, decode step at batch {args.batch}, context {args.context} ({base_ref})")
    print(f"{'variant':<16}{'ms/step':>10}")
    for name, values in times.items():
        print(f"{name:<16}{median_ms(values[1:]):>10}")
    del dense

    refs = engine_bench.make_adapters(store, base_ref, max(args.adapters))
    r, cache = runner(True, slots=max(args.adapters))
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


if __name__ == "__main__":
    main()
