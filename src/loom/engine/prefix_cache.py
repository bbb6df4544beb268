"""Prompt-prefix KV reuse: requests that start with the same tokens (an agent's system
prompt, few-shot examples, the chat template's preamble) skip prefilling them.

Like vLLM's automatic prefix caching and SGLang's radix cache, but sized for
this engine's contiguous per-sequence KV slots: an entry is one prompt's K/V
(all layers), copied out of its slot after prefill; a later prompt with the
same adapter that shares at least ``min_tokens`` leading tokens copies that
many positions into its own slot and prefills only the rest. Entries are
keyed by the adapter as loaded (``name@version`` and a load serial; None for
the base): a LoRA on any layer changes the hidden states, hence K/V, so
entries never cross adapters, and neither a hot-swap (a new version) nor a
reload of a local folder can hit a stale entry.
Memory is bounded by bytes, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


def shared_prefix_len(seqs: list[list[int]]) -> int:
    """How many leading tokens all of ``seqs`` share (the lexicographic extremes bound it)."""
    lo, hi = min(seqs), max(seqs)
    for i, (a, b) in enumerate(zip(lo, hi, strict=False)):
        if a != b:
            return i
    return len(lo)


def kv_nbytes(k: torch.Tensor) -> int:
    """Bytes of an entry holding ``k`` and a V of the same shape."""
    return 2 * k.numel() * k.element_size()


def common_len(a: np.ndarray, b: np.ndarray) -> int:
    """Leading tokens two id arrays share. A lookup compares the prompt with every entry
    of its bucket (an agent's conversations share the system prompt, so one bucket holds
    them all): vectorised, 2,000 tokens take 4.4 us, a Python loop over them 194 us."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass(eq=False)  # identity: entries hold tensors
class Entry:
    tokens: np.ndarray  # int64 ids
    k: torch.Tensor  # [layers, kv_heads, n, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return kv_nbytes(self.k)


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 8) -> None:
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        # (adapter key, first min_tokens tokens) -> entries, most recently used last
        self.buckets: dict[tuple[str | None, tuple[int, ...]], list[Entry]] = {}
        self.lru: OrderedDict[int, tuple[tuple[str | None, tuple[int, ...]], Entry]] = OrderedDict()
        self.bytes = 0
        self.hits = self.lookups = self.tokens_saved = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _bucket(self, adapter: str | None, tokens: list[int]) -> tuple[str | None, tuple[int, ...]]:
        return adapter, tuple(tokens[: self.min_tokens])

    def match(self, adapter: str | None, prompt: list[int], count: bool = True) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``prompt`` and that length; the length
        always leaves at least one prompt token to prefill (its logits start decoding)."""
        if not self.enabled or len(prompt) <= self.min_tokens:
            return None, 0
        self.lookups += count
        best, best_n = None, 0
        ids = np.asarray(prompt, dtype=np.int64)
        for entry in self.buckets.get(self._bucket(adapter, prompt), []):
            n = min(common_len(entry.tokens, ids), len(prompt) - 1)
            if n > best_n:
                best, best_n = entry, n
        if best is None or best_n < self.min_tokens:
            return None, 0
        self.lru.move_to_end(id(best))
        self.hits += count
        self.tokens_saved += best_n * count
        return best, best_n

    def insert(self, adapter: str | None, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep ``tokens``' K/V (copies of [layers, kv_heads, n, head_dim]) unless an entry
        already covers them; an entry that is a prefix of ``tokens`` is replaced."""
        if not self.enabled or len(tokens) < self.min_tokens:
            return
        if kv_nbytes(k) > self.max_bytes:  # checked before copying
            return
        ids = np.asarray(tokens, dtype=np.int64)
        key = self._bucket(adapter, tokens)
        for old in list(self.buckets.get(key, [])):
            shared = common_len(old.tokens, ids)
            if shared == len(ids):  # covered (a short answer to a cached prompt): no copy
                self.lru.move_to_end(id(old))
                return
            if shared == len(old.tokens):
                self._drop(id(old))
        entry = Entry(ids, k.clone(), v.clone())
        while self.bytes + entry.nbytes > self.max_bytes and self.lru:
            self._drop(next(iter(self.lru)))
        self.buckets.setdefault(key, []).append(entry)
        self.lru[id(entry)] = (key, entry)
        self.bytes += entry.nbytes

    def _drop(self, entry_id: int) -> None:
        key, entry = self.lru.pop(entry_id)
        bucket = self.buckets[key]
        bucket.remove(entry)
        if not bucket:
            del self.buckets[key]
        self.bytes -= entry.nbytes

    def clear(self) -> None:
        self.buckets.clear()
        self.lru.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_bytes": self.bytes,
            "prefix_cache_entries": len(self.lru),
            "prefix_cache_lookups": self.lookups,
            "prefix_cache_hits": self.hits,
            "prefix_tokens_saved": self.tokens_saved,
        }
