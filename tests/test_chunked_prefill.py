"""Chunked prefill: a prompt longer than a step's prefill budget fills its KV slot a
chunk per iteration, between the running rows' decode steps, with the same tokens as
a whole prefill (and as PEFT); cancelling it or an error in a chunk ends only it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import tiny_engine
from test_engine import reference

from loom.engine import Engine, SamplingParams
from loom.store import Store

CHUNK = 16
LONG = "the quick brown fox jumps over the lazy dog and then " * 4 + "plays some music"


@pytest.fixture(scope="module")
def engine(engine_store: Store) -> Iterator[Engine]:
    eng = tiny_engine(
        engine_store,
        max_batch_size=8,
        max_seq_len=256,
        kv_cache_mb=16,
        max_adapters=4,
        max_rank=8,
        max_prefill_tokens_per_step=CHUNK,
        prefix_cache_mb=0,
    )
    yield eng
    eng.shutdown()


def record_prefills(engine: Engine, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    """Patch the runner: each prefill call appends how many tokens it computed."""
    calls: list[int] = []
    original = engine.runner.prefill

    def prefill(cache: Any, first: int, prompts: list[list[int]], slots: Any, starts: Any = None) -> Any:
        starts = starts or [0] * len(prompts)
        calls.append(sum(len(p) - s for p, s in zip(prompts, starts, strict=True)))
        time.sleep(delay)
        return original(cache, first, prompts, slots, starts)

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    return calls


def test_long_prompts_in_chunks_match_peft(
    engine: Engine, engine_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = len(engine.tokenize(LONG))
    assert n > 3 * CHUNK
    eos = engine.scheduler.eos_ids
    calls = record_prefills(engine, monkeypatch)
    for adapter in [None, "all8@v1", "qv4@v1"]:
        calls.clear()
        done = engine.generate(LONG, adapter=adapter, params=SamplingParams(max_new_tokens=8))
        assert done.error is None
        assert calls == [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else []), calls
        assert done.token_ids == reference(engine_store, adapter, LONG, 8, eos), adapter
    assert engine.stats()["prefilling_tokens_left"] == 0


def test_running_rows_decode_between_chunks(engine: Engine, engine_store: Store) -> None:
    engine.load_adapter("all8@v1")  # no load wait: the short row would decode through that too
    short = engine.submit("play some music", params=SamplingParams(max_new_tokens=60, ignore_eos=True))
    deadline = time.monotonic() + 30
    while short.sink.squeue.empty() and time.monotonic() < deadline:  # it is decoding
        time.sleep(0.001)
    long = engine.generate(LONG, adapter="all8@v1", params=SamplingParams(max_new_tokens=6))
    while not (chunk := short.sink.squeue.get(timeout=30)).finished:
        pass
    first = chunk.completion
    assert first is not None and first.error is None and len(first.token_ids) == 60
    assert long.time_to_first_token_s is not None
    long_started, long_first = long.token_times[0] - long.time_to_first_token_s, long.token_times[0]
    between = [t for t in first.token_times if long_started < t < long_first]
    # one decode step of the short row after every chunk but the last (which joins it)
    chunks = -(-len(engine.tokenize(LONG)) // CHUNK)
    assert chunks >= 4  # a whole prefill would let the short row decode once at most
    assert len(between) >= chunks - 1, (len(between), chunks)
    assert long.token_ids == reference(engine_store, "all8@v1", LONG, 6, engine.scheduler.eos_ids)


def test_cancel_while_prefilling(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    record_prefills(engine, monkeypatch, delay=0.02)
    key = engine.load_adapter("o2@v1")
    req = engine.submit(LONG, adapter="o2@v1", params=SamplingParams(max_new_tokens=4))
    deadline = time.monotonic() + 30
    while engine.stats()["prefilling_tokens_left"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.stats()["prefilling_tokens_left"] > 0
    engine.cancel(req.id)
    while not (chunk := req.sink.squeue.get(timeout=30)).finished:
        pass
    assert chunk.completion is not None and chunk.completion.finish_reason == "cancelled"
    assert not chunk.completion.token_ids
    assert engine.stats()["prefilling_tokens_left"] == 0
    assert engine.adapters.resident[key].refs == 0  # its adapter slot was given back
    assert engine.generate("play some music", params=SamplingParams(max_new_tokens=3)).error is None


def test_an_error_in_a_chunk_ends_only_that_request(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    short = engine.submit("play some music", params=SamplingParams(max_new_tokens=40, ignore_eos=True))
    deadline = time.monotonic() + 30
    while short.sink.squeue.empty() and time.monotonic() < deadline:  # it is decoding
        time.sleep(0.001)
    original = engine.runner.prefill
    calls = []

    def failing(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the long prompt's second chunk
            raise RuntimeError("boom")
        return original(*args)

    monkeypatch.setattr(engine.runner, "prefill", failing)
    done = engine.generate(LONG, params=SamplingParams(max_new_tokens=4))
    assert done.finish_reason == "error" and done.error is not None and "boom" in done.error
    while not (chunk := short.sink.squeue.get(timeout=30)).finished:
        pass
    assert chunk.completion is not None and chunk.completion.error is None  # the running row went on
    assert len(chunk.completion.token_ids) == 40
    assert engine.stats()["prefilling_tokens_left"] == 0
    monkeypatch.setattr(engine.runner, "prefill", original)
    assert engine.generate(LONG, params=SamplingParams(max_new_tokens=3)).error is None
