"""Adapters: publish with base fingerprint, shape checks, loading through the store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loom.engine import Engine
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


# --- One adapter spec: what Loom cannot serve exactly is refused, with the field named ----------

UNSERVABLE = {  # LoraConfig fields PEFT trains and saves beside plain LoRA -> the field named
    "use_dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "trainable_token_indices": {"trainable_token_indices": [1, 2]},
    "lora_bias": {"lora_bias": True},
}


@pytest.mark.parametrize("field", sorted(UNSERVABLE))
def test_unservable_peft_features_are_refused_at_publish(
    store: Store, tiny_base: str, tiny_dir: Path, tmp_path: Path, field: str
) -> None:
    from helpers import make_lora_adapter

    folder = make_lora_adapter(tiny_dir, tmp_path / field, **UNSERVABLE[field])
    with pytest.raises(CompatibilityError, match=f"adapter_config.json: {field} is .*plain LoRA only"):
        publish_adapter(store, folder, agent="a", name="x")
    assert store.summaries("adapter") == []
    # with the config flag edited away, the saved tensors still give the feature away
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[field] = None
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompatibilityError, match=f"adapter_model.safetensors: .*{field}"):
        publish_adapter(store, folder, agent="a", name="x")


def _edited_copy(src: Path, dest: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """``src`` with its tensors changed by ``edit`` (as a hand-edited file would be)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(dest / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def test_unknown_tensor_and_unpaired_matrix_are_refused(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    norm = "base_model.model.model.norm.weight"
    extra = _edited_copy(tiny_adapter_dir, tmp_path / "extra", lambda t: t.update({norm: torch.ones(64)}))
    with pytest.raises(CompatibilityError, match=r"model\.norm\.weight is not a LoRA A or B matrix"):
        publish_adapter(store, extra, agent="a", name="x")
    lonely = _edited_copy(tiny_adapter_dir, tmp_path / "lonely", lambda t: t.pop(f"{q0}.lora_B.weight"))
    with pytest.raises(CompatibilityError, match="q_proj has lora_A but no lora_B"):
        publish_adapter(store, lonely, agent="a", name="x")
    assert store.summaries("adapter") == []


def test_config_rank_that_does_not_match_the_tensors_is_refused(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    """PEFT would refuse to load it; Loom must not serve it with alpha / a wrong r."""
    folder = tmp_path / "r8"
    shutil.copytree(tiny_adapter_dir, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CompatibilityError, match=r"gives it rank 8 \(r / rank_pattern\)"):
        publish_adapter(store, folder, agent="a", name="x")


def test_verify_reports_an_unservable_adapter_published_before_the_check(
    store: Store, tiny_base: str, tiny_adapter_dir: Path
) -> None:
    publish_adapter(store, tiny_adapter_dir, agent="a", name="old", version="v1")
    stored = store.backend.local_path(store.resolve("old@v1").rel)
    assert stored is not None
    config = stored / "adapter_config.json"
    config.chmod(0o644)
    text = config.read_text()
    config.write_text(text.replace('"use_dora": false', '"use_dora": true '))  # same size
    (report,) = verify_store(store, "old@v1", dry_run=True)
    assert any("use_dora is true" in p for p in report.problems), report.problems


# PEFT matches pattern keys as regexes against the end of the module path: a partial path
# ("layers.1.self_attn.q_proj") is neither the full module name nor its short name.
PATTERNS = {
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {"layers.1.self_attn.q_proj": 3.0, r"layers\.0\..*v_proj": 1.0},
}


@pytest.mark.parametrize("rslora", [False, True])
def test_spec_ranks_and_scales_equal_peft(tiny_dir: Path, tmp_path: Path, rslora: bool) -> None:
    from helpers import make_lora_adapter
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from loom.store.adapter_spec import AdapterSpec

    folder = make_lora_adapter(tiny_dir, tmp_path / "patterns", use_rslora=rslora, **PATTERNS)
    spec = AdapterSpec.from_folder(folder)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), folder)
    want = {
        name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for name, m in peft.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert {k: (m.rank, m.scale) for k, m in spec.modules.items()} == want
    assert len({s for _r, s in want.values()}) >= 3  # the patterns really give modules other scales
    assert (spec.rank, spec.targets) == (4, ["q_proj", "v_proj"])


def test_engine_serves_pattern_adapters_as_peft_does(
    engine: Engine, engine_store: Store, tmp_path: Path
) -> None:
    from helpers import Fp32Reference, make_lora_adapter

    base_dir = engine_store.backend.local_path(engine_store.resolve("tiny@v1").rel)
    assert base_dir is not None
    folder = make_lora_adapter(base_dir, tmp_path / "patterns", seed=7, use_rslora=True, **PATTERNS)
    publish_adapter(engine_store, folder, agent="test", name="patterns", base="tiny@v1", version="v1")
    loaded = load_model("tiny@v1", ["patterns@v1"], store=engine_store, device="cpu")
    ids = loaded.tokenizer("play some music", add_special_tokens=False)["input_ids"]
    ref = Fp32Reference(loaded.model, input_ids=torch.tensor([ids]))
    slot = engine.adapters.resident[engine.load_adapter("patterns@v1")].slot
    logits = engine._on_engine_thread(lambda: engine.runner.prefill(engine.cache, 0, [ids], [slot])[0])
    ref.check(logits, (0, -1), "tiny prefill with rank_pattern / alpha_pattern / rslora")


def test_engine_refuses_an_unservable_local_folder(engine: Engine, tiny_dir: Path, tmp_path: Path) -> None:
    from helpers import make_lora_adapter

    folder = make_lora_adapter(tiny_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(CompatibilityError, match="use_dora is true"):
        engine.load_adapter(str(folder))
