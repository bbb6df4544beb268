"""Batched multi-LoRA linear layers: one base matmul for the whole batch, plus
each row's own adapter delta.

Written by hand on purpose: PEFT applies adapters by looping over adapter
names and masking rows (``adapter_names=``), or by switching one active
adapter (``set_adapter``); both waste the shared base. Here every targeted
``nn.Linear`` computes ``x @ W.T`` once for all rows, then for each adapter
present in the batch one small segment matmul ``(x_s @ A_i.T) @ B_i.T * s_i``
over just that adapter's rows (the segmented-gather idea of Punica/S-LoRA).
Adapter weights live stacked in preallocated slot tensors, zero-padded to
``max_rank``, so adapters of different ranks share a batch and loading an
adapter is a copy into a slot, never a reallocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BatchLoRAContext:
    """Which slot each token row uses during the current forward pass.

    ``row_slots[i]`` is the adapter slot of row ``i`` (-1: base only);
    ``groups`` maps each slot present to the row indices using it, computed
    once per step and shared by every layer.
    """

    row_slots: torch.Tensor | None = None
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        self.row_slots = torch.tensor(slots, device=device)
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append(row)
        self.groups = [(s, torch.tensor(rows, device=device)) for s, rows in by_slot.items()]


class BatchedLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; holds ``num_slots`` adapters of rank <= ``max_rank``."""

    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, ctx: BatchLoRAContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        # A is stored transposed ([in, r]) so the hot path is two plain matmuls.
        self.lora_a = torch.zeros(num_slots, self.in_features, max_rank, device=dev, dtype=dt)
        self.lora_b = torch.zeros(num_slots, max_rank, self.out_features, device=dev, dtype=dt)
        self.scale = torch.zeros(num_slots, device=dev, dtype=dt)
        self.ranks = [0] * num_slots  # 0: slot empty; the hot path slices to the real rank

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Install PEFT-shaped ``a`` [r, in] and ``b`` [out, r] into ``slot``."""
        r = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :, :r] = a.t().to(self.lora_a.dtype)
        self.lora_b[slot, :r, :] = b.t().to(self.lora_b.dtype)
        self.scale[slot] = scale
        self.ranks[slot] = r

    def clear_slot(self, slot: int) -> None:
        self.ranks[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.ctx.groups:
            return out
        # x: [rows, tokens, in]; each group is the rows of one adapter slot.
        for slot, rows in self.ctx.groups:
            r = self.ranks[slot]
            if r == 0:
                continue  # the adapter does not target this module
            xs = x.index_select(0, rows)
            delta = (xs @ self.lora_a[slot, :, :r]) @ self.lora_b[slot, :r, :]
            out.index_add_(0, rows, delta * self.scale[slot])
        return out
