"""One request never hurts another: a row that fails in sampling, a failing prefill pass,
more distinct adapters than slots, and alias moves reaching new requests while running
requests finish on their version (the tiny random Mistral)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch
from helpers import make_lora_adapter, tiny_engine
from test_engine import PROMPTS, reference

from loom.engine import Engine, SamplingParams
from loom.engine.request import Request
from loom.errors import LoomError
from loom.store import Store
from loom.store.adapters import publish_adapter


class Raising:
    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("processor exploded")

    def accept(self, token: int) -> None: ...

    def is_terminated(self) -> bool:
        return False


class NaNs(Raising):
    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, float("nan"))


def burst(engine: Engine, jobs: list[tuple[str, str | None, SamplingParams, object]]) -> list[object]:
    """Submit ``jobs`` as one burst (they batch together) and wait for every completion."""
    reqs: list[Request] = [
        engine.submit(p, adapter=a, params=sp, logits_processor=proc, enqueue=False)  # type: ignore[arg-type]
        for p, a, sp, proc in jobs
    ]

    def add_all() -> None:
        for req in reqs:
            engine.scheduler.add(req)

    engine.scheduler.control.put(add_all)
    return [engine._wait(r) for r in reqs]


def test_a_failing_row_ends_alone_and_the_others_match_their_solo_runs(engine: Engine) -> None:
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    good = [(PROMPTS[0], None), (PROMPTS[1], "qv4@v1"), (PROMPTS[2], "all8@v1")]
    alone = [engine.generate(p, adapter=a, params=greedy).token_ids for p, a in good]
    tiny_t = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1e-300)
    jobs = [
        (PROMPTS[0], None, greedy, None),
        (PROMPTS[3], "qv4@v1", greedy, Raising()),
        (PROMPTS[1], "qv4@v1", greedy, None),
        (PROMPTS[3], None, greedy, NaNs()),
        (PROMPTS[2], "all8@v1", greedy, None),
        (PROMPTS[1], "o2@v1", tiny_t, None),  # below the sampling floor: greedy, not NaN
    ]
    done = burst(engine, jobs)
    for i, want in zip((0, 2, 4), alone, strict=True):
        assert done[i].error is None and done[i].token_ids == want, i  # type: ignore[attr-defined]
    assert done[1].finish_reason == "error" and "processor exploded" in done[1].error  # type: ignore[attr-defined]
    assert done[3].finish_reason == "error" and "NaN" in done[3].error  # type: ignore[attr-defined]
    solo = engine.generate(PROMPTS[1], adapter="o2@v1", params=greedy).token_ids
    assert done[5].error is None and done[5].token_ids == solo  # type: ignore[attr-defined]
    with pytest.raises(LoomError, match="repetition_penalty"):
        engine.submit(PROMPTS[0], params=SamplingParams(repetition_penalty=1e9))


def test_sampled_rows_next_to_a_failing_row_still_sample(engine: Engine) -> None:
    seeded = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    alone = engine.generate(PROMPTS[0], params=seeded).token_ids
    again = SamplingParams(**{**seeded.__dict__})
    done = burst(engine, [(PROMPTS[0], None, again, None), (PROMPTS[1], None, SamplingParams(), NaNs())])
    assert done[0].token_ids == alone and done[1].finish_reason == "error"  # type: ignore[attr-defined]


def test_a_failing_prefill_ends_only_its_rows(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    want = engine.generate(PROMPTS[0], params=params).token_ids
    running = engine.submit(PROMPTS[0], params=params)
    while running.sink.squeue.qsize() < 2:  # it is decoding
        time.sleep(0.001)
    real = engine.runner.prefill

    def broken(*args: object, **kw: object) -> torch.Tensor:
        raise RuntimeError("out of memory in this pass")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    failed = engine.generate(PROMPTS[1], params=SamplingParams(max_new_tokens=4))
    monkeypatch.setattr(engine.runner, "prefill", real)
    assert failed.finish_reason == "error" and "out of memory in this pass" in (failed.error or "")
    done = engine._wait(running)
    assert done.error is None and done.token_ids == want


def test_more_distinct_adapters_than_slots_wait_for_a_slot(engine_store: Store) -> None:
    one_slot = tiny_engine(engine_store, max_batch_size=8, max_seq_len=128, kv_cache_mb=8, max_adapters=1)
    try:
        jobs = [(PROMPTS[i % 4], a) for i, a in enumerate(["qv4@v1", "all8@v1", "o2@v1", "qv4@v2"] * 2)]
        done = one_slot.generate_many(jobs, params=SamplingParams(max_new_tokens=6))
        eos = one_slot.scheduler.eos_ids
        for (prompt, adapter), got in zip(jobs, done, strict=True):
            assert got.error is None, got.error
            assert got.token_ids == reference(engine_store, adapter, prompt, 6, eos), adapter
        stats = one_slot.stats()
        assert stats["adapter_counters"]["slot_waits"] >= 3 and stats["adapters_waiting_for_slot"] == 0
    finally:
        one_slot.shutdown()


def test_the_oldest_slot_waiter_gets_the_freed_slot_first(engine_store: Store) -> None:
    """One slot, held by a long request; three other adapters arrive in order (the largest
    first, so a younger one's weights are read first): they take the slot oldest first, and
    none starts before the one ahead of it has finished."""
    one_slot = tiny_engine(engine_store, max_batch_size=8, max_seq_len=128, kv_cache_mb=8, max_adapters=1)
    try:
        holder = one_slot.submit(
            PROMPTS[0], adapter="qv4@v1", params=SamplingParams(max_new_tokens=60, ignore_eos=True)
        )
        while holder.first_token_at is None:
            time.sleep(0.005)
        waiters = []
        for adapter in ("all8@v1", "o2@v1", "qv4@v2"):
            params = SamplingParams(max_new_tokens=4, ignore_eos=True)
            waiters.append(one_slot.submit(PROMPTS[1], adapter=adapter, params=params))
            time.sleep(0.02)
        done = [one_slot._wait(r) for r in [holder, *waiters]]
        assert all(c.error is None for c in done), [c.error for c in done]
        spans = [(r.token_times[0], r.token_times[-1]) for r in [holder, *waiters]]
        for (_, ahead_done), (started, _) in itertools.pairwise(spans):
            assert ahead_done <= started, spans
        # each adapter installed once: no younger one took the slot only to be evicted again
        counters = one_slot.stats()["adapter_counters"]
        assert (counters["loads"], counters["evictions"]) == (4, 3), counters
    finally:
        one_slot.shutdown()


def test_alias_moves_reach_new_requests_and_running_ones_keep_their_version(
    store: Store, tiny_base: str, tiny_dir: Path, tmp_path: Path
) -> None:
    for version, seed in (("v1", 5), ("v2", 6)):
        folder = make_lora_adapter(tiny_dir, tmp_path / version, seed=seed)
        publish_adapter(store, folder, agent="a", name="follow", base=tiny_base, version=version)
    eng = Engine.from_store(tiny_base, device="cpu", store=store, max_seq_len=128, kv_cache_mb=8, max_rank=8)
    eng.resolver.refresh_s = 0.2
    try:
        assert eng.generate("play", adapter="follow", params=SamplingParams(max_new_tokens=2)).adapter == (
            "follow@v1"
        )  # the first version became current
        long = eng.submit("play", adapter="follow", params=SamplingParams(max_new_tokens=60, ignore_eos=True))
        store.set_alias("follow", "current", "v2")
        moved_at = time.monotonic()
        while eng.generate("play", adapter="follow", params=SamplingParams(max_new_tokens=1)).adapter != (
            "follow@v2"
        ):
            assert time.monotonic() - moved_at < 5, "the alias move never reached new requests"
        assert eng._wait(long).adapter == "follow@v1"
        store.rollback("follow")
        time.sleep(0.25)
        assert eng.generate("play", adapter="follow", params=SamplingParams(max_new_tokens=1)).adapter == (
            "follow@v1"
        )
        assert eng.stats()["adapter_counters"]["alias_moves"] == 2
    finally:
        eng.shutdown()


def test_the_sampler_reports_nan_and_inf_rows_and_samples_the_rest() -> None:
    from loom.engine.sampling import RowSampling, sample_batch

    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 0.0, 1.0], [2.0, 0.0, 1.0]])
    greedy = [RowSampling(SamplingParams(), []) for _ in range(3)]
    fast = sample_batch(logits, greedy)  # the all-greedy fast path
    assert fast.tokens == [1, None, 0] and list(fast.errors) == [1]
    hot = SamplingParams(temperature=0.7, seed=1)
    rows = [RowSampling(hot, [], generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    mixed = sample_batch(torch.tensor([[0.0, float("inf"), 1.0], [0.0, 9.0, 1.0]]), rows)
    assert mixed.tokens[0] is None and 0 in mixed.errors and mixed.tokens[1] == 1
    # a processor that masks every token leaves a greedy row with no next token; NaN anywhere in a
    # row is seen even where it is not the row's first maximum
    masked = RowSampling(SamplingParams(), [], processor=_MaskAll())
    rows2 = [masked, RowSampling(SamplingParams(), []), RowSampling(SamplingParams(), [])]
    out = sample_batch(torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, float("nan")], [2.0, 0.0, 1.0]]), rows2)
    assert out.tokens == [None, None, 0] and sorted(out.errors) == [0, 1]


class _MaskAll:
    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, float("-inf"))

    def accept(self, token: int) -> None:
        pass

    def is_terminated(self) -> bool:
        return False


def test_a_local_adapter_folder_streams(engine: Engine, tiny_adapter_dir: Path) -> None:
    import asyncio

    async def run() -> str | None:
        done = await engine.agenerate(
            PROMPTS[0], adapter=str(tiny_adapter_dir), params=SamplingParams(max_new_tokens=3)
        )
        return done.error

    assert asyncio.run(run()) is None
