"""``--dtype auto`` on CPUs: fp32 or bf16 by a cached start-up measurement (loom.models.dtype_probe).

The measurement itself is injected (a fake ``measure_projections``) so the choice is tested
without depending on this machine's speed or load; one test runs the real measurement on
small shapes to check it times both dtypes through the engine's own products.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
import torch
from helpers import SMOLLM2
from typer.testing import CliRunner

import loom.models.dtype_probe as probe
from loom.cli.main import app
from loom.models.dtype_probe import Measurement, ProjShape, choose_cpu_dtype
from loom.serve import ServeConfig, create_app
from loom.serve.plan import plan_from_store
from loom.serve.server import serve_in_thread
from loom.store import Store

runner = CliRunner()


def fake(
    bf16_speedup: float, busy_ms: float = 0.3, one_row: float | None = None
) -> tuple[Callable[[Sequence[ProjShape]], Measurement], list[int]]:
    """A measurement in which bf16 runs ``bf16_speedup`` times fp32's speed (``one_row`` times
    at 1 row, when given); and its call count."""
    calls: list[int] = []

    def measure(shapes: Sequence[ProjShape]) -> Measurement:
        calls.append(len(shapes))
        fp32 = {"1": 40.0, "32": 100.0}
        bf16 = {"1": 40.0 / (one_row or bf16_speedup), "32": 100.0 / bf16_speedup}
        return Measurement({"fp32": fp32, "bf16": bf16}, 0.5, time.time(), busy_ms)

    return measure, calls


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Loom's user cache dir in tmp_path: the default cache file lands there, not in ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = probe.default_cache_path()
    assert path.is_relative_to(tmp_path)
    return path


def test_a_fast_bf16_cpu_serves_bf16_and_a_slow_one_fp32(cache: Path) -> None:
    measure, calls = fake(3.1)
    fast = choose_cpu_dtype(SMOLLM2, cache.with_name("fast.json"), measure)
    assert fast.dtype == torch.bfloat16 and calls == [5]  # q/k/v, o, gate/up, down, vocabulary
    assert fast.reason.startswith("bf16: 3.1x faster than fp32 on this CPU's projection shapes")
    assert (
        "1 row: 40.00 vs 12.90 ms" in fast.reason
        and f"cached at {cache.with_name('fast.json')}" in fast.reason
    )
    measure, _ = fake(0.4)  # an AVX2-only CPU converts bf16 in software
    slow = choose_cpu_dtype(SMOLLM2, cache.with_name("slow.json"), measure)
    assert slow.dtype == torch.float32 and slow.reason.startswith("fp32: bf16 runs at 0.40x its speed")
    measure, _ = fake(1.05)  # faster, but not by enough to pay for bf16's rounding
    assert choose_cpu_dtype(SMOLLM2, cache.with_name("even.json"), measure).dtype == torch.float32
    # AVX-512 without bf16 instructions, a 7B shape: the lone row (memory-bound) gains, the batch loses
    measure, _ = fake(0.4, one_row=4.0)
    mixed = choose_cpu_dtype(SMOLLM2, cache.with_name("mixed.json"), measure)
    assert mixed.dtype == torch.float32 and "1.26x faster overall but 0.40x at 32 row(s)" in mixed.reason
    measure, _ = fake(1.5, one_row=0.95)  # today's SmolLM2 on this CPU: even at 1 row, 1.5x at 32
    assert choose_cpu_dtype(SMOLLM2, cache.with_name("smol.json"), measure).dtype == torch.bfloat16


def test_the_cache_skips_the_measurement_and_is_keyed_by_shape(cache: Path) -> None:
    measure, calls = fake(2.0)
    first = choose_cpu_dtype(SMOLLM2, cache, measure)
    again = choose_cpu_dtype(SMOLLM2, cache, measure)
    assert calls == [5] and not first.cached and again.cached and again.dtype == torch.bfloat16
    assert f"read from the cache at {cache}" in again.reason
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert (
        entry["facts"]["torch"] == torch.__version__ and entry["facts"]["shapes"][4]["out_features"] == 49152
    )
    wider = SMOLLM2.model_copy(update={"intermediate_size": 2048})  # another base: measured anew
    choose_cpu_dtype(wider, cache, measure)
    assert calls == [5, 5] and len(json.loads(cache.read_text())["entries"]) == 2


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        '{"entries": [1, 2]}',
        "KEY",  # the right key, a malformed measurement under it
    ],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(cache: Path, damage: str) -> None:
    measure, calls = fake(2.0)
    choose_cpu_dtype(SMOLLM2, cache, measure)
    if damage == "KEY":
        data = json.loads(cache.read_text())
        key = next(iter(data["entries"]))
        data["entries"][key]["measurement"]["step_ms"]["bf16"] = {"1": -1, "32": "fast"}
        damage = json.dumps(data)
    cache.write_text(damage)
    again = choose_cpu_dtype(SMOLLM2, cache, measure)
    assert calls == [5, 5] and not again.cached and again.dtype == torch.bfloat16
    assert choose_cpu_dtype(SMOLLM2, cache, measure).cached and calls == [5, 5]  # rewritten, valid


def test_a_busy_machine_keeps_fp32_and_caches_nothing(cache: Path) -> None:
    measure, calls = fake(3.0, busy_ms=8.0)
    busy = choose_cpu_dtype(SMOLLM2, cache, measure)
    assert busy.dtype == torch.float32 and "the CPU was busy while measuring" in busy.reason
    assert "--dtype bfloat16" in busy.reason and not cache.exists()
    choose_cpu_dtype(SMOLLM2, cache, measure)
    assert calls == [5, 5]


def test_a_small_base_is_fp32_without_measuring(cache: Path) -> None:
    measure, calls = fake(3.0)
    tiny = SMOLLM2.model_copy(update={"hidden_size": 64, "intermediate_size": 128, "vocab_size": 512})
    choice = choose_cpu_dtype(tiny, cache, measure)
    assert choice.dtype == torch.float32 and "not measured" in choice.reason and calls == []


def test_the_real_measurement_times_both_dtypes_through_the_engine_products() -> None:
    shapes = [ProjShape("qkv", 64, 192, 2), ProjShape("vocab", 64, 1000, 1, vocab=True)]
    m = probe.measure_projections(shapes, rows=(1, 4), reps=2)
    assert set(m.step_ms) == {"fp32", "bf16"} and all(set(v) == {"1", "4"} for v in m.step_ms.values())
    assert all(ms > 0 for v in m.step_ms.values() for ms in v.values()) and m.busy_ms > 0
    assert Measurement.from_json(json.loads(json.dumps(m.__dict__))).step_ms == m.step_ms


@pytest.fixture
def measured(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every plan measures (even the tiny test base) and finds bf16 2.5x faster; the call count."""
    measure, calls = fake(2.5)
    monkeypatch.setattr(probe, "measure_projections", measure)
    monkeypatch.setattr(probe, "MIN_MEASURED_ELEMENTS", 0)
    return calls


def test_the_plan_serves_what_was_measured_unless_told_otherwise(
    engine_store: Store, measured: list[int]
) -> None:
    plan = plan_from_store(ServeConfig(base="tiny", device="cpu"), engine_store, [])
    assert plan.dtype == "bfloat16" and plan.variant == "bfloat16" and measured == [5]
    assert plan.dtype_reason.startswith("bf16: 2.5x faster than fp32") and any(
        n.startswith("dtype: bf16: 2.5x faster") for n in plan.notes
    )
    given = plan_from_store(ServeConfig(base="tiny", device="cpu", dtype="float32"), engine_store, [])
    assert given.dtype == "float32" and given.dtype_reason == "given: --dtype float32"
    prefer = ServeConfig(base="tiny", device="cpu", variant_preference=["int8", "fp32"])
    preferred = plan_from_store(prefer, engine_store, [])
    assert preferred.dtype == "float32" and "variant_preference" in preferred.dtype_reason
    assert measured == [5]  # neither an explicit dtype nor the agents' preference measures


def test_the_dry_run_says_what_was_picked_and_why(
    engine_store: Store, measured: list[int], cache: Path
) -> None:
    env = {"LOOM_STORE": engine_store.url, "COLUMNS": "400"}
    base = ["serve", "--dry-run", "--base", "tiny", "--device", "cpu"]
    table = runner.invoke(app, base, env=env)
    assert table.exit_code == 0, table.output
    flat = " ".join(table.output.split())
    assert "dtype │ bfloat16 │" in flat and "note │ dtype: bf16: 2.5x faster than fp32 on this CPU" in flat
    as_json = json.loads(runner.invoke(app, [*base, "--json"], env=env).output)
    assert as_json["dtype_reason"].endswith(f"read from the cache at {cache})") and measured == [5]
    given = json.loads(runner.invoke(app, [*base, "--json", "--dtype", "float32"], env=env).output)
    assert given["dtype"] == "float32" and given["dtype_reason"] == "given: --dtype float32"


def test_info_serves_the_measured_dtype_and_says_why(engine_store: Store, measured: list[int]) -> None:
    cfg = ServeConfig(base="tiny", device="cpu", max_batch_size=2, max_seq_len=64, max_adapters=2)
    with serve_in_thread(create_app(cfg, store=engine_store)) as url:
        info = httpx.get(f"{url}/info").json()
        answer = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
    assert info["dtype"] == "bfloat16" and info["plan"]["dtype"] == "bfloat16"  # the engine runs bf16
    assert info["dtype_reason"].startswith("bf16: 2.5x faster than fp32 on this CPU's projection shapes")
    assert answer.status_code == 200, answer.text


# loom.testing.make_tiny_model's shape: every projection's (in, out) differs
TINY = SMOLLM2.model_copy(
    update={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
    }
)


def test_the_probe_times_each_part_in_the_form_the_runner_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed or dense, per dtype and part: what the probe times is what the engine runs."""
    import loom.engine.linear as linear
    from loom.engine.runner import ModelRunner
    from loom.testing import make_tiny_model

    held: dict[tuple[str, torch.dtype], bool] = {}
    for dtype in (torch.float32, torch.bfloat16):
        r = ModelRunner(make_tiny_model().to(dtype), 1, 4)
        parts = {"qkv": r.qkv[0].base, "o": r.o_proj[0].base, "gate_up": r.gate_up[0].base}
        parts |= {"down": r.down[0].base, "vocab": r.head}
        held |= {(name, dtype): base.packed is not None for name, base in parts.items()}
    shapes = probe.projection_shapes(TINY)
    name_of = {(s.in_features, s.out_features): s.name for s in shapes}
    assert len(name_of) == len(shapes) == 5
    measured: dict[tuple[str, torch.dtype], bool] = {}

    class Recording(linear.FrozenLinear):
        def __init__(
            self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, vocab: bool = False
        ) -> None:
            super().__init__(weight, bias, pack, vocab)
            name = name_of[(self.in_features, self.out_features)]
            measured[(name, weight.dtype)] = self.packed is not None

    monkeypatch.setattr(linear, "FrozenLinear", Recording)
    probe.measure_projections(shapes, rows=(1,), reps=1)
    assert measured == held
    onednn = linear.can_pack(torch.zeros(1, 1))
    assert held[("qkv", torch.bfloat16)] == (onednn and linear.native_bf16())  # bf16 packed where it can be


def test_the_cache_key_changes_with_the_forms_the_engine_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    import loom.engine.linear as linear

    shapes = probe.projection_shapes(SMOLLM2)
    key = probe.cache_key(probe.cache_facts(shapes))
    assert probe.cache_facts(shapes)["probe"] == probe.PROBE_VERSION
    native = linear.native_bf16()
    monkeypatch.setattr(linear, "native_bf16", lambda: not native)  # bf16 packed or not
    if linear.can_pack(torch.zeros(1, 1)):  # without oneDNN nothing is packed either way
        assert probe.cache_key(probe.cache_facts(shapes)) != key
    monkeypatch.setattr(linear, "native_bf16", lambda: native)
    assert probe.cache_key(probe.cache_facts(shapes)) == key
    monkeypatch.setitem(linear.KEEP_DENSE, torch.bfloat16, linear.KEEP_DENSE[torch.bfloat16] ^ {"down"})
    assert probe.cache_key(probe.cache_facts(shapes)) != key
