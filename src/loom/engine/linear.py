"""The frozen base products ``x @ W.T (+ bias)`` of the engine, in the fastest form the
device has.

On CUDA these are plain ``F.linear``. On CPUs, where decoding a batch is a few dozen
rows against every weight of the model, the form matters:

* **oneDNN-packed weights** (when torch is built with oneDNN, as the PyPI wheels are):
  the weight is reordered once, at start-up, into the blocked layout oneDNN's GEMM reads
  directly (``torch.ops.mkldnn._reorder_linear_weight``; the same prepacking torch's own
  inductor applies to frozen CPU linears). A plain ``F.linear`` or ``mm`` repacks the
  weight into that kind of layout on every call, which for decode-sized inputs is a
  large part of the work. fp32 weights are packed on any such CPU; bf16 weights where
  the CPU computes bf16 natively (``avx512_bf16`` or AMX, ``native_bf16``): elsewhere
  oneDNN would emulate bf16 and the packed form is unmeasured, so the dense one stays.
  Which parts of a layer the runner packs is decided per dtype by measuring whole decode
  steps (``KEEP_DENSE``; ``benchmarks/decode_step.py --compare pack``, figures in
  BENCHMARKS.md, engine issue 4 and issue 18 sections). Results agree with ``F.linear``
  to rounding (the engine's PEFT token-for-token tests run through this path; bf16 ones
  in ``tests/test_linear.py``).
* otherwise ``fast_linear``: ``(W @ x.T).T`` for decode-sized inputs, ``F.linear`` for
  prefill.

Hand-written only as far as choosing the form: the products are torch's (oneDNN, MKL).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# ``fast_linear``'s transposed form up to this many tokens (decode), F.linear beyond (prefill)
FAST_LINEAR_MAX_TOKENS = 128
# oneDNN picks its weight layout for an expected input row count; any row count then
# works. 32 rows (a full decode batch here) measured best for decode and equal to
# ``F.linear`` for prefill-sized inputs (0.9-1.1x from 512 to 2,048 tokens).
PACK_ROWS_HINT = 32
# Parts of a layer (``qkv``, ``o``, ``gate_up``, ``down``; ``vocab`` for the head) that the
# runner keeps dense even where they could be packed, per dtype, because whole decode steps
# measured faster so (BENCHMARKS.md): fp32 down_proj (wide input, narrow output); in bf16
# down_proj measured faster packed, at every batch and in prefill.
KEEP_DENSE: dict[torch.dtype, frozenset[str]] = {
    torch.float32: frozenset({"down"}),
    torch.bfloat16: frozenset(),
}


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``; for decode-sized inputs on CPUs as ``(weight @ x.T).T``:
    we measured it 1.2-1.8x faster than ``x @ weight.T`` for the few rows of decoding
    (weights as the tall operand). From a few hundred tokens on (prefill) plain
    ``F.linear`` is faster again: 1.1-1.8x at 300-1,440 tokens."""
    flat = x.reshape(-1, x.shape[-1])
    if x.device.type != "cpu" or flat.shape[0] > FAST_LINEAR_MAX_TOKENS:
        return F.linear(x, weight, bias)
    # The transposed result is copied back to row-major: every op downstream (norms,
    # rotary, SiLU) measured ~20% slower per decode step on the strided layout.
    out = (weight @ flat.t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def native_bf16() -> bool:
    """Whether oneDNN runs bf16 products on this CPU in hardware (``avx512_bf16`` or AMX).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone also says yes on plain
    AVX-512 CPUs, where oneDNN emulates bf16 with fp32 instructions."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, torch >= 2.3
    hardware = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return hardware and supported is not None and bool(supported())


def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be held oneDNN-packed: a CPU tensor, torch built with oneDNN,
    fp32, or bf16 on a CPU with native bf16 (``native_bf16``)."""
    return (
        weight.device.type == "cpu"
        and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and native_bf16()))
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packs(part: str, dtype: torch.dtype) -> bool:
    """Whether the runner asks for ``part`` (see ``KEEP_DENSE``) to be packed in ``dtype``;
    ``can_pack`` still decides whether it can be."""
    return part not in KEEP_DENSE.get(dtype, frozenset())


class FrozenLinear:
    """``x @ weight.T (+ bias)`` for a weight that never changes.

    With ``pack=True`` and a packable weight (``can_pack``) the weight is kept only in
    oneDNN's blocked layout: the dense tensor is not referenced afterwards, so memory is
    not doubled as long as the caller drops its own references."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, vocab: bool = False
    ) -> None:
        """``vocab``: the vocabulary projection, whose dense form on CPUs runs chunked
        (``vocab_linear``; it takes no bias)."""
        if vocab and bias is not None:
            raise ValueError("the vocabulary projection takes no bias here; add it to the logits")
        self.vocab = vocab
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.bias = bias.detach() if bias is not None else None
        self.dense: torch.Tensor | None = weight.detach()
        self.packed: torch.Tensor | None = None
        if pack and can_pack(weight):
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.dense, PACK_ROWS_HINT)
            self.dense = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            assert self.dense is not None
            if self.vocab:
                return vocab_linear(x, self.dense)
            return fast_linear(x, self.dense, self.bias)
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def release_weights(linears: list[nn.Linear]) -> None:
    """Drop the weights of ``linears`` whose product now runs from a packed copy.

    The engine owns its model and never calls these modules; an empty weight makes a
    stray call fail loudly on shapes instead of keeping a second copy of the weights."""
    for lin in linears:
        empty = torch.empty(0, device=lin.weight.device, dtype=lin.weight.dtype)
        lin.weight = nn.Parameter(empty, requires_grad=False)


def vocab_linear(x: torch.Tensor, weight: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``x @ weight.T`` for a dense vocabulary projection ([tokens, hidden] -> [tokens, vocab]).

    On CPUs the weight is taken ``chunk`` rows at a time, each product written in place:
    one [vocab, tokens] product is several MB that falls out of cache, and we measured
    the chunked form 16 ms vs 20 ms per decode step at batch 32 (SmolLM2, 49k vocab)."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    out = x.new_empty(weight.shape[0], x.shape[0])
    xt = x.t()
    for start in range(0, weight.shape[0], chunk):
        torch.mm(weight[start : start + chunk], xt, out=out[start : start + chunk])
    return out.t().contiguous()
