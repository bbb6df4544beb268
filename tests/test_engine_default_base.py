"""Integration: the engine on the embedded SmolLM2 default base against a PEFT reference:
greedy tokens identical for a mixed batch of two adapters (different ranks and targets)
and base-only rows sharing a system prompt (so prefix reuse is on the path), and
final-layer logits as close to a float64 reference as PEFT's own fp32 logits are
(``helpers.Fp32Reference``: the tolerance follows from fp32 rounding, not from one CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loom.engine import Engine, SamplingParams
from loom.models import load_model
from loom.store import Store

pytestmark = pytest.mark.integration
BASE = "smollm2-135m-instruct"
ADAPTERS = {"eq-qv": (4, ("q_proj", "v_proj")), "eq-attn": (8, ("q_proj", "k_proj", "v_proj", "o_proj"))}
MESSAGES = ["play the new album by daft punk", "will it snow in denver tomorrow", "book a table for two"]


@pytest.fixture(scope="module")
def engine(default_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from helpers import make_lora_adapter

    from loom.store.adapters import publish_adapter

    tmp = tmp_path_factory.mktemp("eq-adapters")
    base_dir = Path(default_store.backend.local_path(default_store.resolve(BASE).rel) or "")
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        folder = make_lora_adapter(base_dir, tmp / name, seed=10 + i, r=r, targets=targets)
        publish_adapter(default_store, folder, agent=name, name=name, base=BASE, version="v1")
    eng = Engine.from_store(BASE, device="cpu", store=default_store, max_batch_size=8, max_seq_len=256)
    yield eng
    eng.shutdown()


def prompt_ids(engine: Engine, message: str) -> list[int]:
    return engine.tokenize([{"role": "user", "content": message}])


def test_mixed_batch_matches_peft_token_for_token(engine: Engine, default_store: Store) -> None:
    jobs = [(MESSAGES[i % 3], a) for i, a in enumerate(["eq-qv@v1", None, "eq-attn@v1", "eq-qv@v1", None])]
    done = engine.generate_many(
        [(prompt_ids(engine, m), a) for m, a in jobs], params=SamplingParams(max_new_tokens=12)
    )
    eos = sorted(engine.scheduler.eos_ids)
    assert engine.stats()["prefix_cache_hits"] > 0  # the shared system prompt was reused
    for (message, adapter), got in zip(jobs, done, strict=True):
        loaded = load_model(BASE, [adapter] if adapter else [], store=default_store, device="cpu")
        ids = torch.tensor([prompt_ids(engine, message)])
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=eos)
        assert got.token_ids == out[0, ids.shape[1] :].tolist(), (message, adapter)


def test_logits_agree_with_peft_within_fp32_noise(engine: Engine, default_store: Store) -> None:
    from helpers import Fp32Reference

    ids = prompt_ids(engine, MESSAGES[1])
    for adapter in ["eq-attn@v1", None]:
        loaded = load_model(BASE, [adapter] if adapter else [], store=default_store, device="cpu")
        ref = Fp32Reference(loaded.model, input_ids=torch.tensor([ids]))
        slot = engine.adapters.resident[engine.load_adapter(adapter)].slot if adapter else -1

        def prefill_then_decode(slot: int = slot) -> tuple[torch.Tensor, torch.Tensor]:
            first = engine.runner.prefill(engine.cache, 0, [ids[:-1]], [slot])[0]
            last = engine.runner.decode(engine.cache, [ids[-1]], [len(ids) - 1], [slot])[0]
            return first, last

        first, last = engine._on_engine_thread(prefill_then_decode)
        ref.check(first, (0, -2), f"default base prefill {adapter}")
        ref.check(last, (0, -1), f"default base decode {adapter}")
