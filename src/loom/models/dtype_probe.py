"""``--dtype auto`` on CPUs: fp32 or bf16, decided by measuring this machine.

Whether bf16 pays on a CPU depends on more than its flags: on a CPU with ``avx512_bf16``
(or AMX) torch's oneDNN GEMMs run bf16 several times faster than fp32, on an AVX2-only
CPU bf16 is converted in software and loses, and a VM may hide or throttle either. So at
start-up the base's own projection shapes (q/k/v, o, gate/up, down and the vocabulary
projection, as the engine groups them) are run through the engine's own product
(``loom.engine.linear.FrozenLinear``, packed or dense per dtype and part exactly as the
runner holds them: ``loom.engine.linear.packs``) in both dtypes at 1 and 32 rows, a few
reps each, interleaved so that a noisy neighbour slows both alike; the fastest of the reps
(a shared machine delays a sub-millisecond product by whole scheduler slices, which a
best-of-N drops and a median keeps when most reps are hit), weighted by how often a decode
step calls each shape, decide. The result is cached per machine (CPU model, flags, torch
version, oneDNN ISA limit, threads), shape set and the form the engine holds each part in
(packed or dense, per dtype), in Loom's user cache dir, so later starts cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loom.store.manifest import ArchitectureFacts

log = logging.getLogger("loom.models")

# bump when the measurement changes, so old cache entries are not reused (2: bf16 packed where
# the CPU has native bf16, down_proj packed in bf16)
PROBE_VERSION = 2
ROWS = (1, 32)  # a lone decode stream and a full CPU batch
REPS = 5
# bf16 rounds weights and activations: take it only where it is clearly faster
MIN_SPEEDUP = 1.1
# ... and no row count may run slower than this in bf16: a server's throughput is its full
# batch and its latency the lone stream, and neither is traded for the other beyond noise
# (an AVX-512 CPU without bf16 instructions ran a 7B shape's lone row 4x faster in bf16,
# memory-bound, but its 32 rows 2.5x slower).
MIN_ROW_SPEEDUP = 0.9
# After the warm-up and 2 reps, a shape stops repeating once this is spent (a 7B base on a
# CPU whose bf16 is slow would take seconds otherwise).
SHAPE_BUDGET_S = 0.4
# Each shape is measured on at most this many weight elements (64 MiB in fp32: far past any
# cache, so memory-bound behaviour is kept), its time scaled up to the full output width; a
# 7B base's 4096x28672 gate/up would otherwise cost seconds to build and run.
MAX_WEIGHT_ELEMENTS = 16 * 2**20
# Below this many projection weights per decode step (16 MiB in fp32, mostly in cache) the
# dtype hardly changes a step, which call overheads dominate: fp32 (exact), not measured.
MIN_MEASURED_ELEMENTS = 4 * 2**20
# A 256K-element add (1 MiB operands, in cache, split across torch's threads) takes tens of
# microseconds. When other processes hold the cores, every parallel region waits for its
# threads to be scheduled (we saw ~8 ms per product, whatever its size): the times then count
# regions, not arithmetic, and are neither used nor cached.
BUSY_MS = 2.0
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class ProjShape:
    """One product of a decode step: ``count`` calls of [rows, in] @ [in, out]; ``name``: the
    runner's part (``loom.engine.linear.KEEP_DENSE``), which decides its packing per dtype."""

    name: str
    in_features: int
    out_features: int
    count: int
    vocab: bool = False


@dataclass
class Measurement:
    """Milliseconds of a decode step's projections, per dtype name and row count."""

    step_ms: dict[str, dict[str, float]]  # {"fp32": {"1": ms, "32": ms}, "bf16": {...}}
    seconds: float  # what measuring took
    measured_at: float  # unix time
    busy_ms: float = 0.0  # the slowest fastest-of-5 256K-element add (``parallel_overhead_ms``)

    @property
    def reliable(self) -> bool:
        """Whether the machine was quiet enough for the times to mean anything."""
        return self.busy_ms < BUSY_MS

    def speedups(self) -> dict[int, float]:
        """bf16 over fp32, per row count (above 1: bf16 is faster)."""
        fp32, bf16 = self.step_ms["fp32"], self.step_ms["bf16"]
        return {int(r): fp32[r] / bf16[r] for r in fp32}

    def speedup(self) -> float:
        """The geometric mean of ``speedups()``: a lone stream and a full batch count alike."""
        values = list(self.speedups().values())
        return math.exp(sum(math.log(v) for v in values) / len(values))

    @classmethod
    def from_json(cls, data: Any) -> Measurement:
        """Parse a cache entry; raises ValueError on anything malformed."""
        try:
            step = {d: {str(r): float(ms) for r, ms in data["step_ms"][d].items()} for d in ("fp32", "bf16")}
            m = cls(step, float(data["seconds"]), float(data["measured_at"]), float(data.get("busy_ms", 0)))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed measurement: {exc!r}") from None
        if set(step["fp32"]) != set(step["bf16"]) or not step["fp32"]:
            raise ValueError("malformed measurement: row counts differ or are missing")
        if not all(v > 0 and math.isfinite(v) for d in step.values() for v in d.values()):
            raise ValueError("malformed measurement: times must be positive")
        return m


@dataclass
class DtypeChoice:
    """The dtype ``--dtype auto`` serves a base in on a CPU, and why."""

    dtype: torch.dtype
    reason: str
    measurement: Measurement | None = None
    cache_path: Path | None = None
    cached: bool = False


def projection_shapes(arch: ArchitectureFacts) -> list[ProjShape]:
    """The products of one decode step of ``arch``, grouped as the engine runs them."""
    hidden, layers = arch.hidden_size, arch.num_hidden_layers
    kv = arch.num_key_value_heads * (hidden // arch.num_attention_heads)
    return [
        ProjShape("qkv", hidden, hidden + 2 * kv, layers),
        ProjShape("o", hidden, hidden, layers),
        ProjShape("gate_up", hidden, 2 * arch.intermediate_size, layers),
        ProjShape("down", arch.intermediate_size, hidden, layers),
        ProjShape("vocab", hidden, arch.vocab_size, 1, vocab=True),
    ]


def _best_times(shape: ProjShape, rows: Sequence[int], reps: int) -> dict[str, dict[str, float]]:
    """Seconds per call of ``shape`` (capped at MAX_WEIGHT_ELEMENTS, scaled back), by dtype
    name and row count; dtypes and row counts interleaved within each rep."""
    from loom.engine.linear import FrozenLinear, packs

    out = min(shape.out_features, max(64, MAX_WEIGHT_ELEMENTS // shape.in_features))
    scale = shape.out_features / out
    weight = torch.rand(out, shape.in_features).sub_(0.5).mul_(0.1)
    dtypes = (torch.float32, torch.bfloat16)
    # each dtype in the form the runner holds this part in (packed or dense)
    linears = {dt: FrozenLinear(weight.to(dt), None, packs(shape.name, dt), shape.vocab) for dt in dtypes}
    del weight
    inputs = {(dt, r): torch.randn(r, shape.in_features).to(dt) for dt in dtypes for r in rows}
    times: dict[tuple[torch.dtype, int], list[float]] = {key: [] for key in inputs}
    started = time.perf_counter()
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first rep warms up (oneDNN primitive creation)
            if rep > 2 and time.perf_counter() - started > SHAPE_BUDGET_S:
                break
            for r in rows:
                for dt in dtypes:
                    start = time.perf_counter()
                    linears[dt](inputs[(dt, r)])
                    if rep:
                        times[(dt, r)].append(time.perf_counter() - start)
    return {NAMES[dt]: {str(r): min(times[(dt, r)]) * scale for r in rows} for dt in dtypes}


def parallel_overhead_ms(reps: int = 5) -> float:
    """The fastest of ``reps`` multi-threaded 256K-element adds, in ms (see BUSY_MS)."""
    a, b = torch.ones(1 << 18), torch.ones(1 << 18)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a.add(b)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def measure_projections(
    shapes: Sequence[ProjShape], rows: Sequence[int] = ROWS, reps: int = REPS
) -> Measurement:
    """Time a decode step's projections in fp32 and bf16 (see the module docstring)."""
    start = time.perf_counter()
    busy = 0.0
    step: dict[str, dict[str, float]] = {name: {str(r): 0.0 for r in rows} for name in NAMES.values()}
    for shape in shapes:
        busy = max(busy, parallel_overhead_ms())  # busy during any shape: not trusted
        for name, per_rows in _best_times(shape, rows, reps).items():
            for r, seconds in per_rows.items():
                step[name][r] += seconds * shape.count * 1000
    busy = max(busy, parallel_overhead_ms())
    return Measurement(step, time.perf_counter() - start, time.time(), busy)


def _cpu_facts() -> tuple[str, str]:
    """(model name, flags) of this CPU from /proc/cpuinfo; the platform's words elsewhere."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    return model, flags


def cache_facts(shapes: Sequence[ProjShape], rows: Sequence[int] = ROWS) -> dict[str, Any]:
    """What a cached measurement is valid for: this machine, this torch, these shapes."""
    from loom.engine.linear import KEEP_DENSE, can_pack

    model, flags = _cpu_facts()
    return {
        "cpu": model,
        "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # oneDNN's and ATen's ISA limits change the kernels without changing the flags
        "isa_limits": {k: os.environ.get(k) for k in ISA_LIMITS},
        "threads": torch.get_num_threads(),
        # which dtypes the engine holds oneDNN-packed (a change to loom.engine.linear remeasures)
        "packed": {name: can_pack(torch.empty(1, 1, dtype=dt)) for dt, name in NAMES.items()},
        "keep_dense": {name: sorted(KEEP_DENSE.get(dt, ())) for dt, name in NAMES.items()},
        "probe": PROBE_VERSION,
        "rows": list(rows),
        "shapes": [asdict(s) for s in shapes],
    }


def cache_key(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_path() -> Path:
    """``dtype_probe.json`` in Loom's user cache dir (``~/.cache/loom`` on Linux, or $XDG_CACHE_HOME)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("loom", appauthor=False)) / "dtype_probe.json"


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or malformed file counts as empty (it is rewritten)."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("dtype probe cache %s is unreadable (%s): measuring again and rewriting it", path, exc)
        return {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Write atomically; a read-only cache dir only costs the next start a measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the dtype probe cache %s (%s); the next start measures again", path, exc)


def cached_measurement(
    shapes: Sequence[ProjShape],
    cache_path: Path | None = None,
    measure: Callable[[Sequence[ProjShape]], Measurement] | None = None,
) -> tuple[Measurement, Path, bool]:
    """(measurement, cache file, whether it came from the cache) for ``shapes`` on this machine;
    ``measure``: ``measure_projections`` unless given (tests inject one)."""
    path = cache_path or default_cache_path()
    facts = cache_facts(shapes)
    key = cache_key(facts)
    entries = _read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict):
        try:
            return Measurement.from_json(entry.get("measurement")), path, True
        except ValueError as exc:
            log.warning("dtype probe cache %s: entry %s is malformed (%s); measuring again", path, key, exc)
    found = (measure or measure_projections)(shapes)
    if found.reliable:  # a busy machine's times would be reused for good
        entries[key] = {"facts": facts, "measurement": asdict(found)}
        _write_cache(path, entries)
    return found, path, False


def verdict(m: Measurement) -> tuple[torch.dtype, str]:
    """bf16 when it is MIN_SPEEDUP faster overall and no row count is slower than MIN_ROW_SPEEDUP."""
    speedup, per_rows = m.speedup(), m.speedups()
    worst = min(per_rows, key=lambda r: per_rows[r])
    if speedup >= MIN_SPEEDUP and per_rows[worst] >= MIN_ROW_SPEEDUP:
        return torch.bfloat16, f"bf16: {speedup:.1f}x faster than fp32"
    if speedup < MIN_SPEEDUP:
        return (
            torch.float32,
            f"fp32: bf16 runs at {speedup:.2f}x its speed (under the {MIN_SPEEDUP}x worth its rounding)",
        )
    return torch.float32, (
        f"fp32: bf16 is {speedup:.2f}x faster overall but {per_rows[worst]:.2f}x at {worst} row(s) "
        f"(under {MIN_ROW_SPEEDUP}x)"
    )


def describe(m: Measurement, path: Path, cached: bool) -> str:
    """``bf16: 2.1x faster than fp32 on this CPU's projection shapes (...)``, or why fp32."""
    fp32, bf16 = m.step_ms["fp32"], m.step_ms["bf16"]
    rows = ", ".join(
        f"{r} row{'s' if r > 1 else ''}: {fp32[str(r)]:.2f} vs {bf16[str(r)]:.2f} ms"
        for r in sorted(m.speedups())
    )
    how = f"measured in {m.seconds:.1f} s, {'read from the cache' if cached else 'cached'} at {path}"
    return f"{verdict(m)[1]} on this CPU's projection shapes (fp32 vs bf16 per decode step, {rows}; {how})"


def choose_cpu_dtype(
    arch: ArchitectureFacts,
    cache_path: Path | None = None,
    measure: Callable[[Sequence[ProjShape]], Measurement] | None = None,
) -> DtypeChoice:
    """fp32 or bf16 for serving ``arch`` on this CPU, by measurement (cached)."""
    shapes = projection_shapes(arch)
    elements = sum(s.in_features * s.out_features * s.count for s in shapes)
    if elements < MIN_MEASURED_ELEMENTS:
        return DtypeChoice(
            torch.float32,
            f"fp32: the base's projections are small ({elements:,} weights per step), so the dtype "
            "hardly changes the speed; fp32 is exact (not measured)",
        )
    try:
        m, path, cached = cached_measurement(shapes, cache_path, measure)
    except RuntimeError as exc:  # a torch build without CPU bf16 kernels
        return DtypeChoice(torch.float32, f"fp32: bf16 products failed on this CPU ({exc})")
    if not m.reliable:
        reason = (
            f"fp32: the CPU was busy while measuring (a 256K-element add took {m.busy_ms:.1f} ms, over "
            f"{BUSY_MS} ms), so the times say nothing about bf16; not cached, measured again at the next "
            "start. Pass --dtype bfloat16 to choose yourself"
        )
        return DtypeChoice(torch.float32, reason, m, path, cached)
    return DtypeChoice(verdict(m)[0], describe(m, path, cached), m, path, cached)
