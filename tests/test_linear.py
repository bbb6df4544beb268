"""The engine's frozen base products (``loom.engine.linear``): oneDNN-packed and dense forms
give ``F.linear``'s results, packing drops the model's dense copies, and an engine with
packing off generates what the packed one does."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_product_close, tiny_engine
from torch import nn

from loom.engine import Engine, SamplingParams
from loom.engine.linear import FrozenLinear, can_pack
from loom.engine.lora import BatchLoRAContext, Projection
from loom.serve import ServeConfig
from loom.serve.plan import plan_from_store
from loom.store import Store

PACKABLE = can_pack(torch.zeros(1, 1))
needs_onednn = pytest.mark.skipif(not PACKABLE, reason="this torch build has no oneDNN linear")


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


def test_bf16_weights_stay_dense() -> None:
    layer = FrozenLinear(torch.randn(8, 4, dtype=torch.bfloat16), None, pack=True)
    assert layer.packed is None and layer.dense is not None


@needs_onednn
def test_packed_projection_drops_the_dense_weights() -> None:
    q, k = nn.Linear(16, 16, bias=True), nn.Linear(16, 8, bias=False)
    x = torch.randn(3, 16)
    want = [(q.weight.detach().clone(), q.bias.detach().clone()), (k.weight.detach().clone(), None)]
    proj = Projection([q, k], [None, None], BatchLoRAContext(zero_slot=0, max_rank=4), pack=True)
    assert proj.base.packed is not None and proj.base.dense is None
    assert q.weight.numel() == 0 and k.weight.numel() == 0  # no second copy kept
    for got, (weight, bias) in zip(proj(x), want, strict=True):
        assert_product_close(got, x, weight, bias)


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


def test_plan_counts_the_packed_head_copy_on_cpu(engine_store: Store) -> None:
    packed = plan_from_store(ServeConfig(base="tiny", device="cpu"), engine_store, [])
    plain = plan_from_store(ServeConfig(base="tiny", device="cpu", pack_weights=False), engine_store, [])
    assert packed.weights_mb == plain.weights_mb + 1  # tiny: 512 x 64 fp32, rounded up to 1 MiB
    assert any("packed lm_head copy" in n for n in packed.notes)
    assert packed.engine_config().pack_weights and not plain.engine_config().pack_weights
