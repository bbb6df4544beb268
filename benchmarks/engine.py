"""Engine benchmark: HF / PEFT baselines vs. Loom's engine, one run, one table.

    python benchmarks/engine.py [--quick] [--json PATH]
    python benchmarks/engine.py --base mistral-7b-random --device cuda --dtype bfloat16

Workload: N concurrent chat requests (SNIPS dev utterances through the base's
chat template), exactly M new tokens each (eos ignored, so every row does the
same work), greedy, on the store's default base (SmolLM2-135M-Instruct) or
``--base REF`` (``benchmarks/random_base.py`` makes a random-weight Mistral-7B-
shaped one for GPU runs).

Rows:
  1. HF generate, base only, static batch
  2. PEFT, one request at a time, set_adapter per request
  3. PEFT, mixed batch, generate(adapter_names=...)
  4. Loom, base only
  5. Loom, 8 distinct adapters mixed in the batch
  6. Loom, 128 adapters resident out of 1,000 in the store, each request picking one at random
Time to first token counts from when all requests are submitted (t=0), so it
includes queueing. The physical floor for row 4 is max(weight bytes / measured
memory bandwidth, FLOPs / measured matmul rate) per decode step.

Loom's prompt-prefix cache is on by default, as it is when serving: the chat
template's system prompt is shared by every request, the engine's warm-up
request has seen it, and a burst of requests sharing a prefix prefills it once
per adapter. ``--prefix-cache-mb 0`` measures the engine without any reuse.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from loom.store import Store

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips_intent" / "dev.jsonl"
# PEFT's default targets for Llama; bf16 on disk keeps 1,000 adapters under 1 GB.
RANK, TARGETS = 8, ("q_proj", "v_proj")


class PeakMemory:
    """Peak memory while a row runs: this process's resident memory (sampled) on CPU,
    the CUDA caching allocator's peak on GPU."""

    def __init__(self, device: str = "cpu") -> None:
        self.peak = 0
        self.cuda = device.startswith("cuda")
        self.device = torch.device(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = 4096
        while not self._stop.is_set():
            with open("/proc/self/statm") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * page)
            time.sleep(0.01)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarize(
    name: str, wall: float, ttft: list[float], itl: list[float], tokens: int, peak: int
) -> dict[str, Any]:
    return {
        "row": name,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 1),
        "ttft_p95_ms": round(pct(ttft, 0.95) * 1000, 1),
        "itl_p50_ms": round(pct(itl, 0.5) * 1000, 1),
        "itl_p95_ms": round(pct(itl, 0.95) * 1000, 1),
        "peak_mem_mb": round(peak / 2**20),
        "wall_s": round(wall, 2),
    }


def make_adapters(store: Store, base_ref: str, count: int) -> list[str]:
    """Random rank-8 LoRA adapters in the store (created once, reused by later runs)."""
    import tempfile

    from safetensors.torch import save_file

    from loom.store.adapters import publish_adapter

    base = store.resolve(base_ref).manifest.base
    assert base is not None
    a = base.arch
    head = a.hidden_size // a.num_attention_heads
    out_dims = {
        "q_proj": a.hidden_size,
        "k_proj": a.num_key_value_heads * head,
        "v_proj": a.num_key_value_heads * head,
        "o_proj": a.hidden_size,
    }
    existing = {s.artifact.name for s in store.summaries("adapter") if s.artifact.agent == "bench"}
    refs = []
    gen = torch.Generator().manual_seed(0)
    base_name = base_ref.split("@")[0]
    for i in range(count):
        name = f"bench-{i:04d}-{base_name}"  # one set per base
        refs.append(f"{name}@v1")
        if name in existing:
            continue
        tensors = {}
        for layer in range(a.num_hidden_layers):
            for t in TARGETS:
                key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
                a_w = torch.randn(RANK, a.hidden_size, generator=gen) * 0.02
                b_w = torch.randn(out_dims[t], RANK, generator=gen) * 0.02
                tensors[f"{key}.lora_A.weight"] = a_w.to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = b_w.to(torch.bfloat16)
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, f"{tmp}/adapter_model.safetensors")
            Path(tmp, "adapter_config.json").write_text(
                json.dumps(
                    {
                        "peft_type": "LORA",
                        "r": RANK,
                        "lora_alpha": 2 * RANK,
                        "target_modules": list(TARGETS),
                        "task_type": "CAUSAL_LM",
                        "lora_dropout": 0.0,
                        "bias": "none",
                    }
                )
            )
            publish_adapter(store, tmp, agent="bench", name=name, base=base_ref, version="v1")
    return refs


class StepClock:
    """A logits processor that only records when each decode step happens (HF rows)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:  # the step's work is queued, not done, until the GPU catches up
            torch.cuda.synchronize(scores.device)
        self.times.append(time.monotonic())
        return scores


def hf_generate(model: Any, tok: Any, prompts: list[str], new: int, **kw: Any) -> tuple[list[float], int]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([clock]),
            **kw,
        )
    return clock.times, (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)


def run_hf_rows(
    base_path: str, adapters: list[str], store: Store, prompts: list[str], new: int, device: str, dtype: str
) -> list[dict[str, Any]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    tok.padding_side = "left"
    rows = []
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype), device_map=device)
    model.eval()
    with PeakMemory(device) as mem:
        start = time.monotonic()
        times, n = hf_generate(model, tok, prompts, new)
        wall = time.monotonic() - start
    itl = [b - a for a, b in itertools.pairwise(times)]
    rows.append(
        summarize(
            "1. HF generate, base, static batch", wall, [times[0] - start] * len(prompts), itl, n, mem.peak
        )
    )

    paths = {ref: store.backend.local_path(store.resolve(ref).rel) for ref in adapters}
    peft = PeftModel.from_pretrained(model, str(paths[adapters[0]]), adapter_name=adapters[0])
    for ref in adapters[1:]:
        peft.load_adapter(str(paths[ref]), adapter_name=ref)
    peft.eval()
    chosen = [adapters[i % len(adapters)] for i in range(len(prompts))]
    with PeakMemory(device) as mem:
        start = time.monotonic()
        ttft, itl, n = [], [], 0
        for prompt, ref in zip(prompts, chosen, strict=True):
            peft.set_adapter(ref)
            times, k = hf_generate(peft, tok, [prompt], new)
            ttft.append(times[0] - start)
            itl += [b - a for a, b in itertools.pairwise(times)]
            n += k
        wall = time.monotonic() - start
    rows.append(summarize("2. PEFT, one at a time, set_adapter", wall, ttft, itl, n, mem.peak))

    with PeakMemory(device) as mem:
        start = time.monotonic()
        times, n = hf_generate(peft, tok, prompts, new, adapter_names=chosen)
        wall = time.monotonic() - start
    itl = [b - a for a, b in itertools.pairwise(times)]
    rows.append(
        summarize(
            "3. PEFT, mixed batch, adapter_names", wall, [times[0] - start] * len(prompts), itl, n, mem.peak
        )
    )
    return rows


def run_loom_row(
    engine: Any, name: str, prompts: list[str], refs: list[str | None], new: int, device: str
) -> dict[str, Any]:
    from loom.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    with PeakMemory(device) as mem:
        start = time.monotonic()
        done = engine.generate_many(list(zip(prompts, refs, strict=True)), params=params)
        wall = time.monotonic() - start
    errors = [d.error for d in done if d.error]
    if errors:
        raise SystemExit(f"{name}: {errors[0]}")
    ttft = [d.time_to_first_token_s or 0.0 for d in done]
    itl = [b - a for d in done for a, b in zip(d.token_times, d.token_times[1:], strict=False)]
    return summarize(name, wall, ttft, itl, sum(len(d.token_ids) for d in done), mem.peak)


def measure_floor(params: int, weight_bytes: int, batch: int, device: str, dtype: str) -> dict[str, float]:
    """max(weight bytes / copy bandwidth, FLOPs / the rate a large square matmul reaches)."""
    dt = getattr(torch, dtype)

    def timed(fn: Any, reps: int) -> float:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.monotonic()
        for _ in range(reps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.monotonic() - t) / reps

    size = 64 * 2**20 if device == "cpu" else 512 * 2**20
    big, dst = torch.ones(size, device=device), torch.empty(size, device=device)
    bandwidth = 2 * size * 4 / timed(lambda: dst.copy_(big), 10)  # read + write
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    flops = 2 * n**3 / timed(lambda: a @ b, 5)
    step = max(weight_bytes / bandwidth, 2 * params * batch / flops)
    return {"bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9, "floor_step_ms": step * 1000}


def kv_budget_mb(base_ref: str, store: Store, n: int, max_seq_len: int, dtype: str) -> int:
    """1 GiB as before on the default base, more where n full-length sequences need it."""
    info = store.resolve(base_ref).manifest.base
    assert info is not None, f"{base_ref} is not a base"
    a = info.arch
    per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * (a.hidden_size // a.num_attention_heads)
    need = n * max_seq_len * per_token * getattr(torch, dtype).itemsize
    return max(1024, int(need * 1.25 / 2**20))


def run_part(
    part: str,
    n: int,
    new: int,
    total_adapters: int,
    resident: int,
    prefix_mb: int,
    base: str | None,
    device: str,
    dtype: str,
    data: Path,
) -> dict[str, Any]:
    """One process per part: HF/PEFT rows, or Loom rows (torch thread pools never mix)."""
    from transformers import AutoTokenizer

    from loom.engine import Engine, SamplingParams
    from loom.models.loading import plan_load

    store = Store()
    plan = plan_load(base, store=store, verify=False)
    base_ref = plan.base_ref
    rows_text = [json.loads(x)["text"] for x in data.read_text().splitlines() if x][:n]
    all_refs = make_adapters(store, base_ref, total_adapters)
    eight = all_refs[:8]
    tok = AutoTokenizer.from_pretrained(plan.base_path)
    chats = [[{"role": "user", "content": t}] for t in rows_text]
    prompts = [str(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)) for c in chats]
    if part == "hf":
        return {"rows": run_hf_rows(plan.base_path, eight, store, prompts, new, device, dtype)}
    kv_mb, adapter_mb = kv_budget_mb(base_ref, store, n, 256, dtype), 2048
    engine = Engine.from_store(
        base_ref,
        device=device,
        dtype=dtype,
        store=store,
        max_batch_size=n,
        max_seq_len=256,
        kv_cache_mb=kv_mb,
        max_adapters=resident,
        adapter_cache_mb=adapter_mb,
        max_rank=RANK,
        prefix_cache_mb=prefix_mb,
    )
    engine.generate(prompts[0])  # warm-up
    results = [run_loom_row(engine, "4. Loom, base only", prompts, [None] * n, new, device)]
    for ref in eight:
        engine.load_adapter(ref)
    # First calls of the LoRA kernels (on CUDA: their launch set-up) outside the timing;
    # a raw prompt, so no chat prefix is cached for these adapters before row 5.
    engine.generate_many([("warm up", ref) for ref in eight], params=SamplingParams(max_new_tokens=2))
    results.append(
        run_loom_row(
            engine, "5. Loom, 8 adapters mixed", prompts, [eight[i % 8] for i in range(n)], new, device
        )
    )
    cold = []
    for ref in all_refs[8:28]:
        t = time.monotonic()
        engine.load_adapter(ref)
        cold.append(time.monotonic() - t)
    for ref in all_refs[28:resident]:
        engine.load_adapter(ref)
    rng = random.Random(0)
    picks: list[str | None] = [rng.choice(all_refs) for _ in range(n)]
    results.append(
        run_loom_row(
            engine, f"6. Loom, {resident} resident of {total_adapters}, random", prompts, picks, new, device
        )
    )
    stats = engine.stats()
    engine.shutdown()
    budget_ok = {
        "KV cache within budget": stats["kv_cache_bytes"] <= kv_mb * 2**20,
        "adapters within budget": stats["adapter_bytes"] <= adapter_mb * 2**20,
        "prefix cache within budget": stats["prefix_cache_bytes"] <= prefix_mb * 2**20,
    }
    return {"rows": results, "cold": cold, "stats": stats, "budget": budget_ok}


def main() -> None:
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 requests x 32 tokens, same six rows")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=256,
        help="Loom's prompt-prefix K/V cache (0: off, to see the engine without prefix reuse)",
    )
    ap.add_argument("--base", default=None, help="base ref (default: the store's default base)")
    ap.add_argument("--data", type=Path, default=DATA, help="JSONL with a 'text' field (SNIPS dev)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--part", choices=["hf", "loom"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.requests or (16 if args.quick else 32)
    new = args.new_tokens or (32 if args.quick else 64)
    total_adapters = 200 if args.quick else 1000
    resident = 32 if args.quick else 128
    if args.part:
        result = run_part(
            args.part,
            n,
            new,
            total_adapters,
            resident,
            args.prefix_cache_mb,
            args.base,
            args.device,
            args.dtype,
            args.data,
        )
        print("RESULT " + json.dumps(result, default=str))
        return
    from loom.models.loading import plan_load

    store = Store()
    plan = plan_load(args.base, store=store, verify=False)
    base_info = plan.base.manifest.base if plan.base else None
    assert base_info is not None
    print(f"preparing {total_adapters} random rank-{RANK} adapters in {store.url} (once) ...", flush=True)
    make_adapters(store, plan.base_ref, total_adapters)
    parts = {}
    for part in ("hf", "loom"):
        cmd = [sys.executable, __file__, "--part", part, "--requests", str(n), "--new-tokens", str(new)]
        cmd += ["--prefix-cache-mb", str(args.prefix_cache_mb), "--base", plan.base_ref]
        cmd += ["--device", args.device, "--dtype", args.dtype, "--data", str(args.data)]
        proc = subprocess.run([*cmd, *(["--quick"] if args.quick else [])], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"part {part} failed:\n{proc.stderr[-3000:]}")
        parts[part] = json.loads(line[7:])
    results = parts["hf"]["rows"] + parts["loom"]["rows"]
    cold, stats = parts["loom"]["cold"], parts["loom"]["stats"]

    # the floor's weight bytes are those of the compute dtype, whatever is on disk
    weight_bytes = base_info.parameter_count * getattr(torch, args.dtype).itemsize
    floor = measure_floor(base_info.parameter_count, weight_bytes, n, args.device, args.dtype)
    r = {row["row"][:1]: row for row in results}
    loom_step_ms = r["4"]["itl_p50_ms"]
    checks = {
        "(5) >= 0.9 x (4)": r["5"]["tokens_per_s"] >= 0.9 * r["4"]["tokens_per_s"],
        "(5) >= 10 x (2)": r["5"]["tokens_per_s"] >= 10 * r["2"]["tokens_per_s"],
        "(5) >= 3 x (3)": r["5"]["tokens_per_s"] >= 3 * r["3"]["tokens_per_s"],
        "(4) >= 2 x (1)": r["4"]["tokens_per_s"] >= 2 * r["1"]["tokens_per_s"],
        "(6) >= 0.85 x (5)": r["6"]["tokens_per_s"] >= 0.85 * r["5"]["tokens_per_s"],
        "cold load p50 <= 20 ms": statistics.median(cold) <= 0.020,
        **parts["loom"]["budget"],
    }
    cols = ["tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms", "peak_mem_mb"]
    where = f"{torch.get_num_threads()} CPU threads" if args.device == "cpu" else torch.cuda.get_device_name()
    memory = "peak RSS" if args.device == "cpu" else "peak CUDA memory allocated"
    print(
        f"\nengine benchmark: {n} concurrent requests x {new} new tokens, {plan.base_ref}, "
        f"{args.device} {args.dtype}, {where}, prefix cache {args.prefix_cache_mb} MiB; peak_mem_mb: {memory}"
    )
    print(f"{'row':46}" + "".join(f"{c:>13}" for c in cols))
    for row in results:
        print(f"{row['row']:46}" + "".join(f"{row[c]:>13}" for c in cols))
    print(
        f"\nadapter cold load from the local store: p50 {statistics.median(cold) * 1000:.1f} ms, "
        f"p95 {pct(cold, 0.95) * 1000:.1f} ms"
    )
    print(
        f"physical floor for (4): {floor['floor_step_ms']:.1f} ms/step (bandwidth "
        f"{floor['bandwidth_gb_s']:.1f} GB/s, matmul {floor['matmul_gflop_s']:.0f} GFLOP/s); Loom "
        f"{loom_step_ms:.1f} ms/step = {floor['floor_step_ms'] / loom_step_ms:.0%} of the floor"
    )
    for name, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {name}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": results, "floor": floor, "cold_load_s": cold, "checks": checks, "engine": stats},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
