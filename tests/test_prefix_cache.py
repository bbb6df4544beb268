"""Prompt-prefix K/V reuse: the cache's bookkeeping, prefill from a cached prefix against
a whole-prompt prefill, and engine outputs with shared prefixes against PEFT."""

from __future__ import annotations

import numpy as np
import torch
from helpers import Fp32Reference
from test_engine import peft_model, reference

from loom.engine import Engine, SamplingParams
from loom.engine.prefix_cache import PrefixCache, common_len, shared_prefix_len
from loom.store import Store

SHARED = "the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog. "
SUFFIXES = ["play some music", "what is the weather", "book a table for two", "play some jazz"]


def kv(n: int, fill: float = 1.0) -> torch.Tensor:
    return torch.full((2, 1, n, 4), fill)  # [layers, kv_heads, n, head_dim]


def test_shared_prefix_len() -> None:
    assert shared_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2, 3, 9]]) == 2
    assert shared_prefix_len([[1, 2], [1, 2, 3]]) == 2
    assert shared_prefix_len([[5], [6]]) == 0


def test_match_insert_replace_and_evict() -> None:
    entry_bytes = 2 * kv(12).numel() * 4
    cache = PrefixCache(max_bytes=2 * entry_bytes, min_tokens=4)
    prompt = list(range(12))
    cache.insert(None, prompt, kv(12), kv(12))
    entry, n = cache.match(None, [*prompt, 99, 100])
    assert entry is not None and n == 12
    entry, n = cache.match(None, prompt)  # a whole-prompt hit still leaves one token to compute
    assert n == 11
    assert cache.match("lora@v1#0", [*prompt, 5]) == (None, 0)  # never across adapters
    assert cache.match(None, [0, 1, 2, 7, 8, 9]) == (None, 0)  # under min_tokens shared
    cache.insert(None, prompt[:8], kv(8), kv(8))  # already covered: not stored twice
    assert cache.stats()["prefix_cache_entries"] == 1
    longer = [*prompt, 12, 13]  # extends the entry: replaces it
    cache.insert(None, longer, kv(14, 2.0), kv(14, 2.0))
    assert cache.stats()["prefix_cache_entries"] == 1
    assert cache.match(None, [*longer, 1])[1] == 14
    cache.insert(None, [50 + i for i in range(12)], kv(12), kv(12))
    cache.insert(None, [80 + i for i in range(12)], kv(12), kv(12))  # over budget: LRU goes
    assert cache.bytes <= cache.max_bytes
    assert cache.match(None, [*longer, 1]) == (None, 0)
    assert cache.match(None, [80 + i for i in range(12)] + [1])[1] == 12
    off = PrefixCache(0)
    off.insert(None, prompt, kv(12), kv(12))
    assert not off.enabled and off.match(None, [*prompt, 1]) == (None, 0)


def test_prefill_from_a_cached_prefix_matches_a_whole_prefill(engine: Engine) -> None:
    runner, cache = engine.runner, engine.cache
    ids = engine.tokenize(SHARED + SUFFIXES[0])
    cut = len(ids) // 2
    slot = engine.adapters.resident[engine.load_adapter("all8@v1")].slot

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        whole = runner.prefill(cache, 0, [ids, ids], [slot, -1])
        cache.k[:, 2:4, :, :cut] = cache.k[:, 0:2, :, :cut]  # the prefix, as the scheduler copies it
        cache.v[:, 2:4, :, :cut] = cache.v[:, 0:2, :, :cut]
        cache.k[:, 2:4, :, cut:] = cache.v[:, 2:4, :, cut:] = float("nan")  # must be overwritten
        resumed = runner.prefill(cache, 2, [ids, ids], [slot, -1], [cut, cut - 3])
        assert not torch.isnan(cache.k[:, 2:4, :, : len(ids)]).any()
        cache.k[:, 2:4].zero_()  # later tests decode in these slots: leave no NaN behind
        cache.v[:, 2:4].zero_()
        return whole, resumed

    whole, resumed = engine._on_engine_thread(both)
    for row, adapter in enumerate(["all8@v1", None]):
        ref = Fp32Reference(peft_model(engine.store, adapter)[0], input_ids=torch.tensor([ids]))
        ref.check(whole[row], (0, -1), f"whole prefill {adapter}")
        ref.check(resumed[row], (0, -1), f"resumed prefill {adapter}")


def test_shared_prefixes_match_peft_in_a_burst_and_from_the_cache(
    engine: Engine, engine_store: Store
) -> None:
    eos = engine.scheduler.eos_ids
    adapters = [None, "qv4@v1", "all8@v1", None, "qv4@v1", "o2@v1", None, "all8@v1"]
    jobs = [(SHARED + SUFFIXES[i % 4], a) for i, a in enumerate(adapters)]
    params = SamplingParams(max_new_tokens=8)
    before = engine.stats()
    burst = engine.generate_many(jobs, params=params)  # arrive together: the prefix is seeded once
    seeded = engine.stats()
    assert seeded["prefix_cache_hits"] - before["prefix_cache_hits"] >= len(jobs) - 3
    for (prompt, adapter), done in zip(jobs, burst, strict=True):
        assert done.error is None
        assert done.token_ids == reference(engine_store, adapter, prompt, 8, eos), (prompt, adapter)
    again = engine.generate_many(jobs, params=params)  # later: whole prompts come from the cache
    after = engine.stats()
    assert after["prefix_cache_hits"] - seeded["prefix_cache_hits"] == len(jobs)
    assert after["prefix_tokens_saved"] > seeded["prefix_tokens_saved"]
    assert [d.token_ids for d in again] == [d.token_ids for d in burst]


def test_common_len() -> None:
    a = np.array([1, 2, 3, 4], dtype=np.int64)
    assert common_len(a, np.array([1, 2, 9], dtype=np.int64)) == 2
    assert common_len(a, a[:3]) == 3 and common_len(a[:0], a) == 0
    assert common_len(a, np.array([7], dtype=np.int64)) == 0


def peft_greedy(store: Store, adapter: str | None, ids: list[int], n: int) -> list[int]:
    model, _ = peft_model(store, adapter)
    with torch.no_grad():
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return list(out[0, len(ids) :].tolist())


def test_a_conversations_next_turn_reuses_the_whole_history(engine: Engine, engine_store: Store) -> None:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for adapter in [None, "qv4@v1"]:
        first_ids = engine.tokenize(SHARED + "turn one for " + str(adapter))
        first = engine.generate(first_ids, adapter=adapter, params=params)
        # the next turn: the history (prompt and answer) and a new message
        second_ids = first_ids + first.token_ids + engine.tokenize(" and then play some jazz")
        before = engine.stats()["prefix_tokens_saved"]
        second = engine.generate(second_ids, adapter=adapter, params=params)
        saved = engine.stats()["prefix_tokens_saved"] - before
        # every token whose K/V the first turn computed: its prompt and all outputs but the last
        assert saved == len(first_ids) + len(first.token_ids) - 1, (saved, adapter)
        assert second.token_ids == peft_greedy(engine_store, adapter, second_ids, 8), adapter

    engine.scheduler.remember_outputs = False  # prompts only: the answer is prefilled again
    try:
        first_ids = engine.tokenize(SHARED + "turn one, prompts only")
        first = engine.generate(first_ids, params=params)
        before = engine.stats()["prefix_tokens_saved"]
        engine.generate(first_ids + first.token_ids + engine.tokenize(" more"), params=params)
        assert engine.stats()["prefix_tokens_saved"] - before == len(first_ids)
    finally:
        engine.scheduler.remember_outputs = True
