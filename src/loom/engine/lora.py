"""Batched multi-LoRA linear layers: one base matmul for the whole batch, plus
each row's own adapter delta.

Written by hand on purpose: PEFT applies adapters by looping over adapter
names and masking rows (``adapter_names=``), or by switching one active
adapter (``set_adapter``); both waste the shared base. Here the base product
is computed once for all rows, then every row's delta ``(x_i @ A_i) @ B_i * s_i``.
Adapter weights live stacked in preallocated slot tensors, zero-padded to
``max_rank``, so adapters of different ranks and target sets share a batch,
and loading an adapter is a copy into a slot, never a reallocation. The
last slot is all zeros: base-only rows use it there.

Three ways to compute the deltas, chosen once per forward pass (``BatchLoRAContext``):

* **dense** (decode, few distinct adapters): gather only the U adapters in
  the batch, ``xa = x @ [A_1 .. A_U]`` in one matmul, zero every row's
  columns but its own adapter's, then add ``xa @ [B_1; ..; B_U]`` in place:
  three ops per projection whatever the batch size, and the gathered weights
  are kept until the batch's adapter set changes. Measured on the 2-core CPU
  at batch 32 with 8 adapters: cheaper than gathering 32 per-row copies of A
  and B (Punica's BGMV), which moves 4x the bytes.
* **gather** (decode with many distinct adapters): BGMV, each row's A and B
  gathered by slot, two batched matmuls. Dense work grows with U, gather's
  does not: ``benchmarks/decode_step.py`` at batch 32, rank 8 on q/v (base only
  125.4 ms per step) measured dense vs gather 136.9 / 136.2 ms at U=8, 140.0 /
  144.2 at U=16, 148.2 / 136.9 at U=28; hence ``DENSE_MAX_COLUMNS`` = 16
  adapters of rank 8.
* **segments** (prefill, where rows are tokens): the scheduler puts rows of
  one adapter side by side and each run gets two plain matmuls (SGMV-style).
  Dense would multiply every token by all U adapters; gathering A per token
  copies megabytes per module.

Parts of a projection that no adapter in the batch targets are skipped.

Projections that share an input (q/k/v; gate/up) run as one matmul over
their concatenated weights (as vLLM's merged projections do): fewer, larger
matmuls use the cores better than three small ones. The original modules'
weights become views of the merged tensor (or are dropped once packed), so
memory is not doubled.

The base products themselves are ``loom.engine.linear.FrozenLinear`` (oneDNN-packed
weights on CPUs), or ``loom.engine.quantized.QuantizedLinear`` for a quantized variant's
modules (which carry their weights as ``loom_quant``); the deltas run in the model's dtype
(bf16 on a bf16 base; fp32 on fp32 bases and on quantized variants, whose outputs are fp32).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from loom.engine.linear import FrozenLinear, release_weights
from loom.engine.quantized import QuantizedLinear, concat_out

# Dense deltas while U x max_rank stays this small (columns of ``x @ [A_1 .. A_U]``);
# beyond, the gather path (see the module docstring for the crossover measured).
DENSE_MAX_COLUMNS = 128


@dataclass
class BatchLoRAContext:
    """Which adapter each row uses during the current forward pass (shared by all layers).

    ``index`` maps rows to slots (base-only rows to the zero slot) for the gather
    path; ``unique``/``mask`` describe the dense path; ``segments`` the prefill
    path; all empty when no row uses an adapter, so layers skip the LoRA work
    entirely. ``epoch`` changes whenever the set of adapters in the batch or any
    slot's weights change, so projections can keep their gathered dense weights
    between decode steps.
    """

    zero_slot: int
    max_rank: int
    index: torch.Tensor | None = None
    unique: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [rows, 1, U * max_rank]: 1 on the row's own adapter's columns
    segments: tuple[tuple[int, int, int], ...] = ()  # prefill: (slot, first row, end row) runs
    epoch: int = 0
    used: frozenset[int] = frozenset()  # slots the current rows use
    _dense_used: tuple[int, ...] = ()
    _masks: dict[int, torch.Tensor] | None = None
    _dense_rows: tuple[int, ...] | None = None  # the decode rows the dense mask was built for

    def set_rows(self, slots: list[int], device: torch.device, dtype: torch.dtype, prefill: bool) -> None:
        """``slots``: each row's adapter slot (-1: base only); in a prefill a row is one token
        and rows of one adapter come side by side (the scheduler orders them so)."""
        if not prefill and self._dense_rows == tuple(slots) and self.mask is not None:
            return  # the same rows as the last decode step: its dense mask still holds
        self.index = self.unique = self.mask = None
        self.segments = ()
        self._masks = {}
        self._dense_rows = None
        self.used = frozenset(s for s in slots if s >= 0)
        used = tuple(sorted(self.used))
        if not used:
            return
        if prefill:
            # Prefill rows are tokens: dense would multiply each by every adapter's A, and
            # gathering A per token copies MBs per module. Runs of one adapter are computed
            # with two plain matmuls each (SGMV-style segments).
            runs = [(slot, sum(1 for _ in group)) for slot, group in itertools.groupby(slots)]
            ends = list(itertools.accumulate(n for _, n in runs))
            self.segments = tuple(
                (slot, e - n, e) for (slot, n), e in zip(runs, ends, strict=True) if slot >= 0
            )
        elif len(used) * self.max_rank <= DENSE_MAX_COLUMNS:
            if used != self._dense_used:
                self._dense_used = used
                self.epoch += 1
            position = {s: i for i, s in enumerate(used)}
            mask = torch.zeros(len(slots), len(used), self.max_rank, dtype=dtype)
            for row, s in enumerate(slots):
                if s >= 0:
                    mask[row, position[s]] = 1
            self.unique = torch.tensor(used, device=device)
            self.mask = mask.reshape(len(slots), 1, -1).to(device)
            self._dense_rows = tuple(slots)
        else:
            self.index = torch.tensor([s if s >= 0 else self.zero_slot for s in slots], device=device)

    def mask_for(self, parts: int) -> torch.Tensor:
        """The dense mask repeated for ``parts`` adapted projections side by side."""
        assert self.mask is not None and self._masks is not None
        if parts not in self._masks:
            self._masks[parts] = self.mask.repeat(1, 1, parts) if parts > 1 else self.mask
        return self._masks[parts]

    def weights_changed(self) -> None:
        self.epoch += 1


class LoRASlots:
    """Adapter storage for one targeted linear: ``num_slots`` adapters of rank <= ``max_rank``."""

    def __init__(
        self, in_features: int, out_features: int, ctx: BatchLoRAContext, like: torch.Tensor
    ) -> None:
        self.in_features, self.out_features, self.ctx = in_features, out_features, ctx
        self.filled: set[int] = set()  # slots holding weights: parts no row's adapter targets are skipped
        slots = ctx.zero_slot + 1  # + the zero slot
        # A is stored transposed ([in, r]) and B as [r, out] already multiplied by the
        # adapter's scale, so the hot path is plain matmuls with no per-module scaling.
        self.lora_a = torch.zeros(slots, in_features, ctx.max_rank, device=like.device, dtype=like.dtype)
        self.lora_b = torch.zeros(slots, ctx.max_rank, out_features, device=like.device, dtype=like.dtype)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Install PEFT-shaped ``a`` [r, in] and ``b`` [out, r] into ``slot``."""
        self.install(slot, *self.prepare(a, b, scale))

    def prepare(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's ``a`` [r, in], ``b`` [out, r] in the slots' layout and dtype (A transposed,
        B transposed and scaled). Done by the loading thread, so that installing on the
        engine thread, between decode steps, is only two copies per module."""
        dtype = self.lora_a.dtype
        return a.t().to(dtype).contiguous(), (b.t().float() * scale).to(dtype).contiguous()

    def install(self, slot: int, a_t: torch.Tensor, b_s: torch.Tensor) -> None:
        """Copy ``prepare``'s output into ``slot``; a rank below max_rank zeroes the rest
        (a larger adapter may have held the slot)."""
        r = a_t.shape[1]
        self.lora_a[slot, :, :r].copy_(a_t)
        self.lora_b[slot, :r, :].copy_(b_s)
        if r < self.lora_a.shape[2]:
            self.lora_a[slot, :, r:].zero_()
            self.lora_b[slot, r:, :].zero_()
        self.filled.add(slot)
        self.ctx.weights_changed()

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.filled.discard(slot)
        self.ctx.weights_changed()

    def gathered(self, unique: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense path's ``[A_1 .. A_U]`` ([in, U*r]) and ``[B_1; ..; B_U]`` ([U*r, out])."""
        a = self.lora_a.index_select(0, unique).permute(1, 0, 2).reshape(self.in_features, -1)
        b = self.lora_b.index_select(0, unique).reshape(-1, self.out_features)
        return a, b

    def gather_delta(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """BGMV: each row's own A and B, gathered by slot; ``x`` is [rows, tokens, in]."""
        a = self.lora_a.index_select(0, index)
        b = self.lora_b.index_select(0, index)
        return torch.bmm(torch.bmm(x, a), b)


class Projection:
    """One or more frozen linears that read the same input (q/k/v, gate/up, or a single
    one), computed as one matmul over their concatenated weights, plus LoRA deltas for
    the targeted parts. Calling it returns one output per part."""

    def __init__(
        self,
        linears: list[nn.Linear],
        loras: list[LoRASlots | None],
        ctx: BatchLoRAContext,
        pack: bool = False,
    ) -> None:
        self.ctx, self.loras = ctx, loras
        self.sizes = [lin.out_features for lin in linears]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(linears))]
        self.adapted = [
            (off, n, lo) for off, n, lo in zip(self.offsets, self.sizes, loras, strict=True) if lo
        ]
        # (epoch, parts any row's adapter targets, their A's side by side, block of their B's)
        self._dense: tuple[int, int, torch.Tensor | None, torch.Tensor | None] | None = None
        weight: torch.Tensor = linears[0].weight
        bias: torch.Tensor | None = linears[0].bias
        if len(linears) > 1:
            weight = torch.cat([lin.weight for lin in linears]).detach()
            biases = [lin.bias for lin in linears]
            if any(b is not None for b in biases):
                pairs = zip(biases, self.sizes, strict=True)
                bias = torch.cat([b if b is not None else weight.new_zeros(n) for b, n in pairs])
        quant = [getattr(lin, "loom_quant", None) for lin in linears]
        self.base: FrozenLinear | QuantizedLinear
        if all(q is not None for q in quant):  # a quantized variant (loom.models.quantize)
            self.base = QuantizedLinear(concat_out([q for q in quant if q is not None]), bias)
        else:
            self.base = FrozenLinear(weight, bias, pack)
        if isinstance(self.base, QuantizedLinear):
            for lin in linears:  # the merged copy is the only one kept
                lin.loom_quant = None  # type: ignore[assignment]
        elif self.base.packed is not None:
            release_weights(linears)  # the packed copy is the only one kept
        elif len(linears) > 1:
            for lin, off, n in zip(linears, self.offsets, self.sizes, strict=True):
                # the originals become views of the merged tensor: no second copy in memory
                lin.weight = nn.Parameter(weight[off : off + n], requires_grad=False)
                if lin.bias is not None and bias is not None:
                    lin.bias = nn.Parameter(bias[off : off + n], requires_grad=False)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.merged(x)
        return [out[..., off : off + n] for off, n in zip(self.offsets, self.sizes, strict=True)]

    def merged(self, x: torch.Tensor) -> torch.Tensor:
        """Every part's output side by side (base product plus deltas), unsplit."""
        out = self.base(x)
        if self.adapted:
            self._add_deltas(x, out)
        return out

    def _add_deltas(self, x: torch.Tensor, out: torch.Tensor) -> None:
        ctx = self.ctx
        if ctx.unique is not None:
            # Dense: the adapters in the batch rarely change between decode steps, so their
            # gathered weights are kept until they do. One matmul computes x @ A for every
            # adapted part and adapter at once; one addmm adds every part's delta in place
            # through a block matrix of the B's (zero where a part has no adapter). That is
            # 3 ops per projection instead of ~5 per adapted part (measured 140 vs 345 us
            # for q/k/v at batch 32 with 8 adapters).
            if self._dense is None or self._dense[0] != ctx.epoch:
                self._dense = (ctx.epoch, *self._gather_dense(ctx.unique))
            _, parts, a_all, b_block = self._dense
            if a_all is None or b_block is None:
                return
            flat = x.reshape(-1, x.shape[-1])
            xa = torch.mm(flat, a_all).mul_(ctx.mask_for(parts).reshape(flat.shape[0], -1))
            out.view(-1, out.shape[-1]).addmm_(xa, b_block)
        elif ctx.index is not None:
            for off, n, lora in self._active():
                out[..., off : off + n] += lora.gather_delta(x, ctx.index)
        elif ctx.segments:
            flat, out2d = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
            for off, n, lora in self._active():
                for slot, start, end in ctx.segments:
                    if slot in lora.filled:
                        xa = flat[start:end] @ lora.lora_a[slot]
                        out2d[start:end, off : off + n].addmm_(xa, lora.lora_b[slot])

    def _active(self) -> list[tuple[int, int, LoRASlots]]:
        """Adapted parts that some row's adapter actually targets (an adapter trained on
        q/v leaves k/o alone: no delta work for them)."""
        return [part for part in self.adapted if not part[2].filled.isdisjoint(self.ctx.used)]

    def _gather_dense(self, unique: torch.Tensor) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        active = self._active()
        if not active:
            return 0, None, None
        gathered = [lora.gathered(unique) for _, _, lora in active]
        a_all = torch.cat([a for a, _ in gathered], dim=1)
        width = gathered[0][1].shape[0]
        b_block = a_all.new_zeros(width * len(gathered), self.base.out_features)
        for i, ((off, n, _), (_, b)) in enumerate(zip(active, gathered, strict=True)):
            b_block[i * width : (i + 1) * width, off : off + n] = b
        return len(active), a_all, b_block
