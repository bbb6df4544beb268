"""The engine against a PEFT reference on the tiny random Mistral: same greedy tokens,
logits within fp32 rounding noise of a float64 reference, mixed batches of adapters with different ranks and
targets, stop strings, cancellation, hot-swap, bad adapters, eviction."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from helpers import Fp32Reference, tiny_engine

from loom.engine import Engine, SamplingParams
from loom.engine.detok import IncrementalDecoder
from loom.errors import CompatibilityError, LoomError
from loom.store import Store
from loom.store.adapters import publish_adapter

PROMPTS = ["play some music", "what is the weather", "book a table for two", "the quick brown fox"]


def peft_model(store: Store, adapter: str | None) -> tuple[object, object]:
    from loom.models import load_model

    loaded = load_model("tiny@v1", [adapter] if adapter else [], store=store, device="cpu")
    return loaded.model, loaded.tokenizer


def reference(store: Store, adapter: str | None, prompt: str, n: int, eos: set[int]) -> list[int]:
    model, tok = peft_model(store, adapter)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(  # type: ignore[attr-defined]
            **ids, max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=0
        )
    gen = out[0, ids["input_ids"].shape[1] :].tolist()
    return gen


def test_single_requests_match_peft_token_for_token(engine: Engine, engine_store: Store) -> None:
    eos = engine.scheduler.eos_ids
    for adapter in [None, "qv4@v1", "all8@v1", "o2@v1"]:
        done = engine.generate(PROMPTS[0], adapter=adapter, params=SamplingParams(max_new_tokens=12))
        assert done.finish_reason in {"stop", "length"} and done.error is None
        assert done.token_ids == reference(engine_store, adapter, PROMPTS[0], 12, eos), adapter


def test_mixed_batch_matches_peft(engine: Engine, engine_store: Store) -> None:
    eos = engine.scheduler.eos_ids
    jobs = [(PROMPTS[i % 4], a) for i, a in enumerate(["qv4@v1", None, "all8@v1", "o2@v1", None, "qv4@v1"])]
    results = engine.generate_many(jobs, params=SamplingParams(max_new_tokens=10))
    for (prompt, adapter), done in zip(jobs, results, strict=True):
        assert done.adapter == adapter
        assert done.token_ids == reference(engine_store, adapter, prompt, 10, eos), (prompt, adapter)


def test_mixed_batch_matches_peft_with_gathered_deltas(
    engine: Engine, engine_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode normally computes few-adapter deltas densely; force the per-row gather path."""
    import loom.engine.lora

    monkeypatch.setattr(loom.engine.lora, "DENSE_MAX_COLUMNS", 0)
    eos = engine.scheduler.eos_ids
    jobs = [(PROMPTS[i % 4], a) for i, a in enumerate(["all8@v1", "o2@v1", None, "qv4@v1"])]
    results = engine.generate_many(jobs, params=SamplingParams(max_new_tokens=10))
    for (prompt, adapter), done in zip(jobs, results, strict=True):
        assert done.token_ids == reference(engine_store, adapter, prompt, 10, eos), (prompt, adapter)


def test_prefill_with_adapters_in_any_row_order_matches_rows_alone(engine: Engine) -> None:
    """Prefill computes LoRA per run of same-adapter rows; interleaved adapters must still
    give every row exactly what it gets alone."""
    slots = [engine.adapters.resident[engine.load_adapter(a)].slot for a in ("qv4@v1", "all8@v1")]
    rows = [slots[0], slots[1], -1, slots[0]]
    prompts = [engine.tokenize(PROMPTS[i]) for i in range(4)]

    def both() -> tuple[torch.Tensor, list[torch.Tensor]]:
        together = engine.runner.prefill(engine.cache, 0, prompts, rows)
        alone = [
            engine.runner.prefill(engine.cache, 0, [p], [s])[0] for p, s in zip(prompts, rows, strict=True)
        ]
        return together, alone

    together, alone = engine._on_engine_thread(both)
    for i, (adapter, single) in enumerate(zip(["qv4@v1", "all8@v1", None, "qv4@v1"], alone, strict=True)):
        model, _ = peft_model(engine.store, adapter)
        ref = Fp32Reference(model, input_ids=torch.tensor([prompts[i]]))
        ref.check(together[i], (0, -1), f"tiny prefill together row {i}")
        ref.check(single, (0, -1), f"tiny prefill alone row {i}")


def test_logits_agree_with_peft_within_fp32_noise(engine: Engine, engine_store: Store) -> None:
    runner, cache = engine.runner, engine.cache
    for adapter in ["qv4@v1", "all8@v1", "o2@v1", None]:
        model, tok = peft_model(engine_store, adapter)
        ids = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
        ref = Fp32Reference(model, input_ids=torch.tensor([ids]))
        slot = engine.adapters.resident[engine.load_adapter(adapter)].slot if adapter else -1

        def prefill_then_decode(ids: list[int] = ids, slot: int = slot) -> tuple[torch.Tensor, torch.Tensor]:
            # row 0 of a spare cache area is fine: the engine is idle between tests
            first = runner.prefill(cache, 0, [ids[:-1]], [slot])[0]
            last = runner.decode(cache, [ids[-1]], [len(ids) - 1], [slot])[0]
            return first, last

        first, last = engine._on_engine_thread(prefill_then_decode)
        ref.check(first, (0, -2), f"tiny prefill {adapter}")
        ref.check(last, (0, -1), f"tiny decode {adapter}")


def test_stop_strings_and_max_tokens(engine: Engine) -> None:
    free = engine.generate(PROMPTS[2], params=SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop = free.text[3:6]
    assert stop.strip(), free.text
    cut = engine.generate(PROMPTS[2], params=SamplingParams(max_new_tokens=20, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]


def test_streaming_and_cancellation(engine: Engine) -> None:
    async def run() -> tuple[str, str, str]:
        chunks = []
        async for chunk in engine.stream(
            PROMPTS[3], params=SamplingParams(max_new_tokens=16, ignore_eos=True)
        ):
            chunks.append(chunk)
        streamed = "".join(c.text for c in chunks)
        final = chunks[-1].completion
        assert final is not None
        req = engine.submit(PROMPTS[3], params=SamplingParams(max_new_tokens=100, ignore_eos=True))
        while req.sink.squeue.empty():
            await asyncio.sleep(0.001)
        engine.cancel(req.id)
        while True:
            c = req.sink.squeue.get(timeout=10)
            if c.finished:
                assert c.completion is not None
                return streamed, final.text, c.completion.finish_reason

    streamed, text, reason = asyncio.run(run())
    assert streamed == text and reason == "cancelled"


def test_hot_swap_while_decoding(engine: Engine, engine_store: Store) -> None:
    eos = engine.scheduler.eos_ids
    engine.resolver.routes.pop("qv4", None)
    old = engine.submit(PROMPTS[0], adapter="qv4", params=SamplingParams(max_new_tokens=100, ignore_eos=True))
    deadline = time.monotonic() + 30
    while old.sink.squeue.qsize() < 2 and time.monotonic() < deadline:  # it is decoding on v1
        time.sleep(0.001)
    assert engine.swap_adapter("qv4", "v2") == "qv4@v2"
    new = engine.generate(PROMPTS[0], adapter="qv4", params=SamplingParams(max_new_tokens=10))
    while True:
        chunk = old.sink.squeue.get(timeout=30)
        if chunk.finished:
            first = chunk.completion
            break
    assert first is not None and first.adapter == "qv4@v1" and first.error is None
    assert first.token_ids[:10] == reference(engine_store, "qv4@v1", PROMPTS[0], 10, set())  # no eos stop
    assert new.adapter == "qv4@v2"
    assert new.token_ids == reference(engine_store, "qv4@v2", PROMPTS[0], 10, eos)
    engine.swap_adapter("qv4", "v1")


def test_bad_adapter_is_refused_while_others_run(engine: Engine, tmp_path: Path, tiny_dir: Path) -> None:
    from helpers import make_lora_adapter, make_tiny_mistral

    wide = make_lora_adapter(make_tiny_mistral(tmp_path / "wide", hidden=96), tmp_path / "wide-lora")
    running = engine.submit(PROMPTS[1], params=SamplingParams(max_new_tokens=30, ignore_eos=True))
    bad = engine.submit(PROMPTS[1], adapter=str(wide))
    got = bad.sink.squeue.get(timeout=30)
    assert got.finished and got.completion and got.completion.finish_reason == "error"
    assert "the base needs" in (got.completion.error or "")
    while True:
        chunk = running.sink.squeue.get(timeout=30)
        if chunk.finished:
            assert chunk.completion and chunk.completion.finish_reason == "length"
            break
    with pytest.raises(CompatibilityError):
        engine.load_adapter(str(wide))


def test_lru_eviction_and_pinning(engine_store: Store) -> None:
    eng = tiny_engine(
        engine_store, max_batch_size=4, max_seq_len=64, kv_cache_mb=4, max_adapters=2, max_rank=8
    )
    try:
        eng.load_adapter("qv4@v1", pin=True)
        for name in ["all8@v1", "o2@v1", "all8@v1"]:
            assert (
                eng.generate(PROMPTS[0], adapter=name, params=SamplingParams(max_new_tokens=2)).error is None
            )
        stats = eng.stats()
        assert "qv4@v1" in stats["resident_adapters"] and len(stats["resident_adapters"]) == 2
        assert stats["adapter_counters"]["evictions"] >= 2
        assert eng.unload_adapter("qv4@v1") and "qv4@v1" not in eng.stats()["resident_adapters"]
    finally:
        eng.shutdown()


def test_bad_requests_are_clear_errors(engine: Engine) -> None:
    with pytest.raises(LoomError, match="max_seq_len"):
        engine.submit("x " * 200, params=SamplingParams(max_new_tokens=10))
    with pytest.raises(LoomError, match="temperature"):
        engine.submit("hi", params=SamplingParams(temperature=-1))
    with pytest.raises(LoomError, match="no artifact named 'nope'"):
        engine.submit("hi", adapter="nope")


def test_incremental_decoding_never_splits_characters(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "héllo 🙂 wörld — ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for streaming in (True, False):  # tokenizers' DecodeStream, and the window fallback
        dec = IncrementalDecoder(tok)
        if not streaming:
            dec.stream = None
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in p for p in pieces), streaming
        assert "".join(pieces) == dec.text == tok.decode(ids) == text, streaming


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    p = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    a = engine.generate(PROMPTS[0], params=p)
    b = engine.generate(PROMPTS[0], params=SamplingParams(**{**p.__dict__}))
    assert a.token_ids == b.token_ids


def test_json_schema_constrained_output(engine: Engine) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"intent": {"enum": ["PlayMusic", "GetWeather"]}},
        "required": ["intent"],
        "additionalProperties": False,
    }
    done = engine.generate(
        PROMPTS[0], params=SamplingParams(max_new_tokens=40), logits_processor=engine.json_processor(schema)
    )
    assert done.finish_reason == "stop", done
    assert json.loads(done.text)["intent"] in {"PlayMusic", "GetWeather"}
    free = engine.generate(PROMPTS[0], params=SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError):
        json.loads(free.text)  # the random model does not write JSON by itself


def test_grammar_mask_allows_exactly_what_llguidance_computes(engine: Engine) -> None:
    """The processor's -inf pattern must be llguidance's own mask (unpacked here with numpy,
    independently of the processor), step after step, on every ISA (torch.compile's kernel
    for this masked the wrong tokens on AVX-512)."""
    import numpy as np

    proc = engine.json_processor({"type": "object", "properties": {"intent": {"type": "string"}}})
    vocab = engine.runner.vocab_size
    for _ in range(4):
        words = np.frombuffer(proc.matcher.compute_bitmask(), dtype=np.uint32)  # type: ignore[attr-defined]
        want = np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab])[0].tolist()
        masked = proc([], torch.zeros(vocab))
        got = torch.nonzero(masked == 0).flatten().tolist()
        assert got == want and got
        proc.accept(got[-1])


def test_regex_constrained_output(engine: Engine) -> None:
    import re

    done = engine.generate(
        PROMPTS[1],
        params=SamplingParams(max_new_tokens=20),
        logits_processor=engine.regex_processor(r"[0-9]{3}"),
    )
    assert re.fullmatch(r"[0-9]{3}", done.text), done.text


def test_breaking_out_of_a_stream_cancels_the_request(engine: Engine) -> None:
    async def run() -> None:
        async for _chunk in engine.stream(
            PROMPTS[2], params=SamplingParams(max_new_tokens=100, ignore_eos=True)
        ):
            break

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while engine.stats()["batch_size"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["batch_size"] == 0 and engine.stats()["tokens_generated"] < 10_000


def test_adapter_for_another_base_is_refused_at_submit(
    engine: Engine, engine_store: Store, tmp_path: Path
) -> None:
    from helpers import import_retemplated_base

    import_retemplated_base(engine_store, "tiny@v1", tmp_path, "other-base")
    adapter = engine_store.backend.local_path(engine_store.resolve("qv4@v1").rel)
    publish_adapter(engine_store, adapter, agent="test", name="foreign", base="other-base@v1", version="v1")
    with pytest.raises(CompatibilityError, match="this engine serves"):
        engine.submit(PROMPTS[0], adapter="foreign@v1")


def test_shutdown_ends_every_request(engine_store: Store) -> None:
    eng = tiny_engine(
        engine_store, max_batch_size=1, max_seq_len=128, kv_cache_mb=4, max_adapters=2, max_rank=8
    )
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    running, queued = eng.submit(PROMPTS[0], params=params), eng.submit(PROMPTS[1], params=params)
    while running.sink.squeue.empty():
        time.sleep(0.001)
    eng.shutdown()
    for req in (running, queued):
        while True:
            chunk = req.sink.squeue.get(timeout=10)
            if chunk.finished:
                assert chunk.completion and chunk.completion.finish_reason == "error"
                assert "shut down" in (chunk.completion.error or "")
                break


def test_damaged_adapter_file_is_refused_while_others_run(
    engine: Engine, engine_store: Store, tiny_dir: Path, tmp_path: Path
) -> None:
    """The engine checks the manifest's sha256 in the same read it loads the weights with."""
    from helpers import make_lora_adapter

    folder = make_lora_adapter(tiny_dir, tmp_path / "fragile", seed=5, r=4)
    publish_adapter(engine_store, folder, agent="test", name="fragile", base="tiny@v1", version="v1")
    stored = engine_store.backend.local_path(engine_store.resolve("fragile@v1").rel)
    assert stored is not None
    weights = stored / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes: still parses as safetensors
    weights.write_bytes(bytes(data))
    params = SamplingParams(max_new_tokens=4)
    bad = engine.submit(PROMPTS[0], adapter="fragile@v1", params=params)
    fine = engine.submit(PROMPTS[1], params=params)
    bad_done, fine_done = Engine._wait(bad), Engine._wait(fine)
    assert bad_done.finish_reason == "error" and "checksum" in (bad_done.error or "")
    assert bad_done.error_kind == "adapter_store" and "loom store verify" in (bad_done.error or "")
    assert fine_done.error is None and len(fine_done.token_ids) == 4
    with pytest.raises(LoomError, match="checksum"):
        engine.load_adapter("fragile@v1")


def test_a_smaller_adapter_in_a_reused_slot_leaves_nothing_of_the_larger() -> None:
    from loom.engine.lora import BatchLoRAContext, LoRASlots

    ctx = BatchLoRAContext(zero_slot=2, max_rank=8)
    slots = LoRASlots(6, 5, ctx, torch.zeros(5, 6))
    big_a, big_b = torch.randn(8, 6), torch.randn(5, 8)
    slots.set_slot(0, big_a, big_b, 0.5)
    assert torch.allclose(slots.lora_a[0], big_a.t()) and torch.allclose(slots.lora_b[0], big_b.t() * 0.5)
    epoch = ctx.epoch
    small_a, small_b = torch.randn(2, 6), torch.randn(5, 2)
    slots.install(0, *slots.prepare(small_a, small_b, 2.0))
    assert ctx.epoch > epoch  # cached gathers of the old weights are invalid
    assert torch.equal(slots.lora_a[0, :, :2], small_a.t()) and not slots.lora_a[0, :, 2:].any()
    assert torch.allclose(slots.lora_b[0, :2], small_b.t() * 2.0) and not slots.lora_b[0, 2:].any()
