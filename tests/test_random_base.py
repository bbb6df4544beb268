"""benchmarks/random_base.py: the random production-shaped base the GPU benchmark runs on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loom.engine import Engine, SamplingParams
from loom.engine.linear import can_pack, native_bf16
from loom.store import Store

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "random_base.py"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("random_base", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_base_imports_sharded_and_runs(
    store: Store, tiny_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rb = _module()
    monkeypatch.setattr(rb, "SHARD_BYTES", 40_000)  # several shards, as a 7B base has
    ref = rb.make_random_base(store, "tiny", "tiny-random", torch.bfloat16)
    assert ref == "tiny-random@v1"
    info = store.resolve(ref).manifest.base
    assert info is not None and info.arch.architecture == "MistralForCausalLM"
    assert info.arch.num_key_value_heads == rb.SHAPES["tiny"]["num_key_value_heads"]
    folder = Path(store.backend.local_path(store.resolve(ref).rel))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert rb.make_random_base(store, "tiny", "tiny-random", torch.bfloat16) == ref  # made once

    engine = Engine.from_store(
        ref, device="cpu", dtype="bfloat16", store=store, max_batch_size=2, kv_cache_mb=8
    )
    try:
        done = engine.generate("hello", params=SamplingParams(max_new_tokens=4, ignore_eos=True))
    finally:
        engine.shutdown()
    assert done.error is None and len(done.token_ids) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_shape_writes_no_lm_head_and_the_engine_keeps_one_packed_copy(
    store: Store, tiny_base: str, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The smollm2-135m shape ties the lm_head to the embeddings, as the real base does; the
    packed head (fp32; bf16 on CPUs with native bf16) is one extra copy in the dtype served."""
    from safetensors import safe_open

    rb = _module()
    assert rb.SHAPES["smollm2-135m"]["tie_word_embeddings"] is True
    monkeypatch.setitem(rb.SHAPES, "tiny-tied", {**rb.SHAPES["tiny"], "tie_word_embeddings": True})
    name = f"tiny-tied-random-{str(dtype).removeprefix('torch.')}"
    ref = rb.make_random_base(store, "tiny-tied", name, dtype)
    folder = Path(store.backend.local_path(store.resolve(ref).rel))
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in set(fh.keys())
    engine = Engine.from_store(
        ref,
        device="cpu",
        dtype=str(dtype).removeprefix("torch."),
        store=store,
        max_batch_size=2,
        kv_cache_mb=8,
    )
    try:
        done = engine.generate("hello", params=SamplingParams(max_new_tokens=4, ignore_eos=True))
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert done.error is None and len(done.token_ids) == 4
    assert stats["dtype"] == str(dtype).removeprefix("torch.")
    onednn = can_pack(torch.zeros(1, 1))  # fp32; bf16 too where the CPU has native bf16
    assert stats["packed_weights"] == (onednn and (dtype == torch.float32 or native_bf16()))
    if stats["packed_weights"]:  # a packed lm_head whose weight the embeddings keep is a second copy
        vocab, hidden = engine.runner.vocab_size, rb.SHAPES["tiny"]["hidden_size"]
        assert stats["packed_head_copy_bytes"] == vocab * hidden * dtype.itemsize
        assert engine.runner.inner.embed_tokens.weight.numel() == vocab * hidden  # the embeddings stay
