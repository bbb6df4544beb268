"""Adapters: publish with base fingerprint, shape checks, loading through the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from loom.errors import CompatibilityError, LoomError
from loom.models import load_model, plan_load
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.verify import verify_store


def test_publish_adapter_records_base_and_lora_facts(
    store: Store, tiny_base: str, tiny_adapter_dir: Path
) -> None:
    m = publish_adapter(
        store, tiny_adapter_dir, agent="intent", name="intent-lora", version="v1", alias="current"
    )
    assert m.agent == "intent" and m.adapter is not None
    base = store.resolve(tiny_base).manifest.base
    assert base is not None
    assert m.adapter.base_ref == tiny_base and m.adapter.base_fingerprint == base.fingerprint
    assert (m.adapter.r, m.adapter.alpha, m.adapter.target_modules) == (4, 8.0, ["q_proj", "v_proj"])
    assert store.backend.exists("adapters/intent/intent-lora/versions/v1/adapter_model.safetensors")
    assert all(r.ok for r in verify_store(store))


def test_adapter_with_wrong_shapes_is_refused(store: Store, tiny_base: str, tmp_path: Path) -> None:
    from helpers import make_lora_adapter, make_tiny_mistral

    other = make_tiny_mistral(tmp_path / "wide", hidden=96)
    adapter = make_lora_adapter(other, tmp_path / "wide-lora")
    with pytest.raises(CompatibilityError, match="does not fit base"):
        publish_adapter(store, adapter, agent="a", name="wide-lora", base=tiny_base)
    assert store.summaries("adapter") == []


def test_pickled_adapter_is_refused(
    store: Store, tiny_base: str, tmp_path: Path, tiny_adapter_dir: Path
) -> None:
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(tiny_adapter_dir / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(LoomError, match="safetensors only"):
        publish_adapter(store, bad, agent="a", name="pickled")


def _greedy(model, tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0].tolist()


def test_loading_base_and_adapter_from_store_changes_output(
    store: Store, tiny_base: str, tiny_adapter_dir: Path
) -> None:
    publish_adapter(store, tiny_adapter_dir, agent="intent", name="intent-lora", version="v1")
    base = load_model(tiny_base, store=store, device="cpu")
    tuned = load_model(tiny_base, ["intent-lora@v1"], store=store, device="cpu")
    assert base.dtype == torch.float32 and tuned.plan.adapters[0].ref == "intent-lora@v1"
    assert _greedy(base.model, base.tokenizer, "play music") != _greedy(
        tuned.model, tuned.tokenizer, "play music"
    )


def test_adapter_for_another_base_is_refused_at_load(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    publish_adapter(store, tiny_adapter_dir, agent="intent", name="intent-lora", version="v1")
    from helpers import import_retemplated_base

    import_retemplated_base(store, tiny_base, tmp_path, "other-base")  # same shapes, new fingerprint
    with pytest.raises(CompatibilityError, match="does not match other-base@v1"):
        plan_load("other-base@v1", ["intent-lora@v1"], store=store)


def test_dry_run_plan_loads_nothing(store: Store, tiny_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_load(None, store=store, dry_run=True)  # default base from the store
    assert plan.base_ref == tiny_base and Path(plan.base_path, "config.json").is_file()
    monkeypatch.setenv("MODEL_STORE_DRY_RUN", "1")
    with pytest.raises(LoomError, match="not loaded"):
        load_model(tiny_base, store=store)


def test_strict_mode_refuses_hub_fallback(store: Store, tiny_base: str) -> None:
    from loom.errors import NotFoundError

    with pytest.raises(NotFoundError, match="strict mode"):
        plan_load("hf:mistralai/Mistral-7B-v0.3", store=store, strict=True)
    plan = plan_load("hf:mistralai/Mistral-7B-v0.3", store=store)
    assert plan.source == "hub"  # not strict: falls back to the hub id
