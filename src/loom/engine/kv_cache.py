"""A preallocated KV cache: ``max_seqs`` slots of ``max_len`` tokens, sized from a byte budget.

Running sequences occupy slots ``0..n-1`` (the scheduler compacts on finish),
so a decode step reads the cache through views, with no gather copies.
"""

from __future__ import annotations

import torch

from loom.errors import LoomError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, max_seqs, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seqs, self.max_len = max_seqs, max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_budget(
        cls,
        budget_bytes: int,
        max_len: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        max_seqs: int | None = None,
    ) -> KVCache:
        per_seq = cls.bytes_per_token(num_layers, kv_heads, head_dim, dtype) * max_len
        fits = budget_bytes // per_seq
        if fits < 1:
            raise LoomError(
                f"KV-cache budget {budget_bytes / 2**20:.0f} MiB cannot hold one sequence of {max_len} "
                f"tokens ({per_seq / 2**20:.1f} MiB); raise kv_cache_mb or lower max_seq_len"
            )
        n = int(min(fits, max_seqs)) if max_seqs else int(fits)
        return cls(num_layers, n, kv_heads, max_len, head_dim, device, dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
