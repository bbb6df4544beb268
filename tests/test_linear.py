"""The engine's frozen base products (``loom.engine.linear``): oneDNN-packed and dense forms
give ``F.linear``'s results in fp32 and bf16, packing drops the model's dense copies, bf16 is
packed only where the CPU computes it natively, and an engine with packing off generates
what the packed one does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SMOLLM2, assert_bf16_product_close, assert_product_close, tiny_engine
from torch import nn

import loom.engine.linear as linear
from loom.engine import Engine, SamplingParams
from loom.engine.linear import FrozenLinear, can_pack
from loom.engine.lora import BatchLoRAContext, Projection
from loom.serve import ServeConfig
from loom.serve.plan import make_plan, plan_from_store
from loom.store import Store

PACKABLE = can_pack(torch.zeros(1, 1))
needs_onednn = pytest.mark.skipif(not PACKABLE, reason="this torch build has no oneDNN linear")
# not can_pack(bf16): a can_pack that stopped packing bf16 would skip the tests meant to catch it
PACKABLE_BF16 = PACKABLE and linear.native_bf16()
needs_native_bf16 = pytest.mark.skipif(
    not PACKABLE_BF16, reason="no oneDNN linear, or a CPU without native bf16 (avx512_bf16, AMX)"
)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_frozen_linear_matches_f_linear(pack: bool, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 48, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(2, rows, 48, generator=gen)
    for b in (None, bias):
        got = FrozenLinear(weight, b, pack)(x)
        assert got.shape == (2, rows, 96)
        assert_product_close(got, x, weight, b)
    vocab = FrozenLinear(weight, None, pack, vocab=True)(x[0])
    assert_product_close(vocab, x[0], weight)
    with pytest.raises(ValueError, match="no bias"):
        FrozenLinear(weight, bias, pack, vocab=True)


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_native_bf16)])
@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_bf16_frozen_linear_matches_f_linear(pack: bool, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 48, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    x = torch.randn(2, rows, 48, generator=gen).bfloat16()
    for b in (None, bias):
        layer = FrozenLinear(weight, b, pack)
        assert (layer.packed is not None) == pack and (layer.dense is None) == pack
        got = layer(x)
        assert got.shape == (2, rows, 96)
        assert_bf16_product_close(got, x, weight, b)
        # torch's own bf16 product meets the same bound: the bound is not tighter than bf16 allows
        assert_bf16_product_close(F.linear(x, weight, b), x, weight, b)
    vocab = FrozenLinear(weight, None, pack, vocab=True)
    assert (vocab.packed is not None) == pack
    assert_bf16_product_close(vocab(x[0]), x[0], weight)


def test_bf16_is_packed_only_on_cpus_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(linear, "native_bf16", lambda: False)  # oneDNN would emulate bf16
    layer = FrozenLinear(weight, None, pack=True)
    assert layer.packed is None and layer.dense is not None
    assert can_pack(torch.zeros(1, 1)) == PACKABLE  # fp32 does not depend on it
    if PACKABLE:
        monkeypatch.setattr(linear, "native_bf16", lambda: True)
        layer = FrozenLinear(weight, None, pack=True)
        assert layer.packed is not None and layer.dense is None


def test_native_bf16_follows_the_cpu_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    if not flags:
        pytest.skip("/proc/cpuinfo lists no x86 flags")
    hardware = "avx512_bf16" in flags or "amx_bf16" in flags
    assert linear.native_bf16() == (hardware and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bf16)])
@needs_onednn
def test_packed_projection_drops_the_dense_weights(dtype: torch.dtype) -> None:
    q, k = nn.Linear(16, 16, bias=True, dtype=dtype), nn.Linear(16, 8, bias=False, dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    want = [(q.weight.detach().clone(), q.bias.detach().clone()), (k.weight.detach().clone(), None)]
    proj = Projection([q, k], [None, None], BatchLoRAContext(zero_slot=0, max_rank=4), pack=True)
    assert proj.base.packed is not None and proj.base.dense is None
    assert q.weight.numel() == 0 and k.weight.numel() == 0  # no second copy kept
    check = assert_product_close if dtype == torch.float32 else assert_bf16_product_close
    for got, (weight, bias) in zip(proj(x), want, strict=True):
        check(got, x, weight, bias)


@needs_onednn
def test_engine_without_packing_generates_what_the_packed_one_does(
    engine: Engine, engine_store: Store
) -> None:
    assert engine.stats()["packed_weights"] is True
    assert engine.runner.model.model.layers[0].self_attn.q_proj.weight.numel() == 0
    dense = tiny_engine(engine_store, pack_weights=False)
    try:
        assert dense.stats()["packed_weights"] is False
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        jobs: list[tuple[str | list[dict[str, str]] | list[int], str | None]] = [
            ("play some music", None),
            ("what is the weather", "qv4"),
            ("book a table for two", "all8"),
        ]
        packed_out = [c.token_ids for c in engine.generate_many(jobs, params=params)]
        dense_out = [c.token_ids for c in dense.generate_many(jobs, params=params)]
        assert packed_out == dense_out
    finally:
        dense.shutdown()


@needs_native_bf16
def test_bf16_engine_packed_generates_what_the_unpacked_one_does(engine_store: Store) -> None:
    """bf16 on a CPU with native bf16: every part packed and its dense weight dropped (down_proj
    too, by measurement: ``KEEP_DENSE``), LoRA deltas added on top, the same greedy tokens as
    torch's plain bf16 GEMMs (both round each product to bf16 once; only the summation order of
    the fp32 accumulations differs)."""
    small = dict(max_batch_size=4, max_seq_len=64, kv_cache_mb=4, max_adapters=2, max_rank=8)
    packed = tiny_engine(engine_store, dtype="bfloat16", **small)
    dense = tiny_engine(engine_store, dtype="bfloat16", pack_weights=False, **small)
    try:
        runner = packed.runner
        assert runner.dtype == torch.bfloat16 and packed.stats()["packed_weights"] is True
        assert dense.stats()["packed_weights"] is False
        layer = runner.model.model.layers[0]
        for part, module in (
            (runner.qkv, layer.self_attn.q_proj),
            (runner.o_proj, layer.self_attn.o_proj),
            (runner.gate_up, layer.mlp.up_proj),
            (runner.down, layer.mlp.down_proj),
        ):
            assert part[0].base.packed is not None and part[0].base.dense is None
            assert module.weight.numel() == 0  # the dense bf16 weight is released
        assert runner.head.packed is not None and runner.model.lm_head.weight.numel() == 0
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        jobs: list[tuple[str | list[dict[str, str]] | list[int], str | None]] = [
            ("play some music", None),
            ("what is the weather", "qv4"),
            ("book a table for two", "all8"),
        ]
        packed_out = [c.token_ids for c in packed.generate_many(jobs, params=params)]
        dense_out = [c.token_ids for c in dense.generate_many(jobs, params=params)]
        assert packed_out == dense_out
        base_only = [c.token_ids for c in packed.generate_many([(j[0], None) for j in jobs], params=params)]
        assert base_only[1:] != packed_out[1:]  # the adapters change the tokens: they run on top
    finally:
        packed.shutdown()
        dense.shutdown()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_counts_the_packed_head_copy_on_cpu(engine_store: Store, dtype: str) -> None:
    packed = plan_from_store(ServeConfig(base="tiny", device="cpu", dtype=dtype), engine_store, [])
    plain = plan_from_store(
        ServeConfig(base="tiny", device="cpu", dtype=dtype, pack_weights=False), engine_store, []
    )
    packs = PACKABLE if dtype == "float32" else PACKABLE_BF16
    assert packed.weights_mb == plain.weights_mb + packs  # tiny: 512 x 64, rounded up to 1 MiB
    assert any(f"packed lm_head copy (CPU {dtype})" in n for n in packed.notes) == packs
    assert packed.engine_config().pack_weights and not plain.engine_config().pack_weights
    # at SmolLM2's size the copy is the head's bytes in the dtype served: 49,152 x 576
    arch = SMOLLM2
    cfg = ServeConfig(device="cpu", dtype=dtype, memory_mb=4096)
    big = make_plan(cfg, arch, None, "smol")
    big_plain = make_plan(dataclasses.replace(cfg, pack_weights=False), arch, None, "smol")
    mib = {"float32": 108, "bfloat16": 54}[dtype]  # 49,152 x 576 x 4 or 2 bytes
    assert big.weights_mb == big_plain.weights_mb + mib * packs
