"""The runner's own forms of transformers' per-layer ops give the same bits, and the dense
LoRA mask kept between decode steps is rebuilt whenever the rows change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from loom.engine.lora import BatchLoRAContext
from loom.engine.runner import additive, norm_fn, rope

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm])
@pytest.mark.parametrize("hidden", [96, 576, 4096])
def test_fused_rms_norm_is_bit_identical(dtype: torch.dtype, cls: type, hidden: int) -> None:
    norm = cls(hidden, eps=1e-5).to(dtype)
    norm.weight.data.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, hidden, generator=torch.Generator().manual_seed(1)).to(dtype) * 4
    assert torch.equal(norm_fn(norm)(x), norm(x))


def test_other_norms_are_called_as_they_are() -> None:
    layer_norm = torch.nn.LayerNorm(8)
    assert norm_fn(layer_norm) is layer_norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_and_k_rotated_together_are_bit_identical(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 6, 16, generator=g).to(dtype), torch.randn(2, 4, 2, 16, generator=g).to(dtype)
    cos, sin = torch.randn(2, 4, 16, generator=g).to(dtype), torch.randn(2, 4, 16, generator=g).to(dtype)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    both = rope(torch.cat([q, k], dim=2), cos.unsqueeze(2), sin.unsqueeze(2))
    assert torch.equal(both[:, :, :6].transpose(1, 2), q_ref)
    assert torch.equal(both[:, :, 6:].transpose(1, 2), k_ref)


def test_additive_mask() -> None:
    allowed = torch.tensor([[True, False], [True, True]])
    assert additive(allowed, torch.float32).tolist() == [[0.0, float("-inf")], [0.0, 0.0]]


def test_the_dense_lora_mask_follows_the_rows() -> None:
    ctx = BatchLoRAContext(zero_slot=4, max_rank=2)
    cpu = torch.device("cpu")
    ctx.set_rows([0, 1, -1], cpu, torch.float32, prefill=False)
    first = ctx.mask
    ctx.set_rows([0, 1, -1], cpu, torch.float32, prefill=False)
    assert ctx.mask is first  # same rows: kept
    ctx.set_rows([1, 0, -1], cpu, torch.float32, prefill=False)
    assert ctx.mask is not None
    assert ctx.mask[0, 0].tolist() == [0, 0, 1, 1] and ctx.mask[1, 0].tolist() == [1, 1, 0, 0]
    ctx.set_rows([1, 1, 0], cpu, torch.float32, prefill=True)  # a prefill in between
    ctx.set_rows([1, 0, -1], cpu, torch.float32, prefill=False)
    assert ctx.mask is not None and ctx.mask[2, 0].tolist() == [0, 0, 0, 0]


def test_hand_built_passes_run_as_the_scheduler_runs_them(tiny_dir: Path) -> None:
    """A prefill then a decode pass, built by hand, give the logits of the same prompt
    prefilled whole: the passes carry everything the runner needs."""
    from transformers import AutoModelForCausalLM

    from loom.engine.runner import ModelRunner
    from loom.engine.step import DecodePass, PrefillPass

    runner = ModelRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), 2, 8)
    cache = runner.new_cache(8 * 2**20, 64, 2)
    ids = [5, 9, 14, 3, 7]
    runner.execute(cache, PrefillPass(0, [ids[:-1]], [-1]))
    stepped = runner.execute(cache, DecodePass([ids[-1]], [len(ids) - 1], [-1]))
    whole = runner.execute(cache, PrefillPass(1, [ids], [-1]))
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-4)
