"""Publishing, immutability, aliases, rollback, gc and verify on the local backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.data.snapshot import snapshot
from loom.errors import IntegrityError, LoomError, NotFoundError, RefError, VersionExistsError
from loom.store import Store
from loom.store.gc import collect
from loom.store.importers import import_hf_dir
from loom.store.manifest import Source
from loom.store.verify import verify_store


def _publish_blob(store: Store, name: str, data: bytes, version: str | None = None, **kw: object):
    def fill(d: Path) -> None:
        (d / "blob.txt").write_bytes(data)

    return store.publish(
        "dataset", name, fill=fill, source=Source(type="local", uri="test"), version=version, **kw
    )


def flip_byte(path: Path, offset: int = 100) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_import_hf_dir_computes_facts(store: Store, tiny_base: str) -> None:
    resolved = store.resolve("tiny-mistral")
    m = resolved.manifest
    assert resolved.ref == tiny_base and m.kind == "base"
    info = m.base
    assert info is not None
    assert info.arch.architecture == "MistralForCausalLM" and info.arch.hidden_size == 64
    # parameter count from headers equals the real model's
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(store.backend.local_path(resolved.rel))
    assert info.parameter_count == sum(p.numel() for p in model.parameters())
    assert info.approx_vram_mb >= info.weight_bytes / 2**20
    assert info.dtype == "float32" and info.peft_support and "nf4_bnb" in info.quantized_variants
    assert info.chat_template_sha256 and info.fingerprint.startswith("fp-")
    assert {f.path for f in m.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_versions_are_immutable_and_auto_versions_get_suffixes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from loom.store import store as store_module

    a = _publish_blob(store, "data", b"one")
    assert re.fullmatch(r"v\d{8}-\d{4}", a.version)
    monkeypatch.setattr(store_module, "auto_version", lambda: a.version)  # same minute
    b = _publish_blob(store, "data", b"two")
    c = _publish_blob(store, "data", b"three")
    assert (b.version, c.version) == (f"{a.version}-2", f"{a.version}-3")
    _publish_blob(store, "data", b"x", version="v1")
    with pytest.raises(VersionExistsError, match="immutable"):
        _publish_blob(store, "data", b"y", version="v1")
    assert store.resolve("data@v1").manifest.files[0].sha256 == __import__("hashlib").sha256(b"x").hexdigest()


def test_names_are_unique_across_kinds(store: Store, tiny_base: str) -> None:
    with pytest.raises(LoomError, match="already used"):
        _publish_blob(store, "tiny-mistral", b"x")


def test_find_looks_in_every_kind_and_agent_and_names_ambiguity(
    store: Store, tiny_base: str, tiny_adapter_dir: Path
) -> None:
    import shutil

    from loom.store.adapters import publish_adapter

    publish_adapter(store, tiny_adapter_dir, agent="intent", name="lora-x", base=tiny_base, version="v1")
    _publish_blob(store, "blobs", b"x", version="v1")
    assert store.find("lora-x").agent == "intent" and store.find("lora-x").kind == "adapter"
    assert store.find("blobs").kind == "dataset" and store.find("tiny-mistral").kind == "base"
    with pytest.raises(NotFoundError, match="no artifact named 'lora-y'"):
        store.find("lora-y")
    root = Path(store.url)  # a hand-edited store: the same name under a second agent
    shutil.copytree(root / store.find("lora-x").rel, root / "adapters" / "other" / "lora-x")
    with pytest.raises(RefError, match="ambiguous"):
        store.find("lora-x")


def test_pickles_are_refused(store: Store, tmp_path: Path, tiny_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_dir / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoomError, match="pickle"):
        import_hf_dir(store, bad, "bad")
    assert store.artifacts() == []  # nothing partial became visible


def test_aliases_rollback_and_history(store: Store) -> None:
    for i in range(3):
        _publish_blob(store, "data", str(i).encode(), version=f"v{i}")
    store.set_alias("data", "current", "v0")
    store.set_alias("data", "current", "v1")
    store.set_alias("data", "current", "v2")
    assert store.resolve("data").version == "v2"
    assert store.rollback("data").version == "v1"
    assert store.rollback("data").version == "v0"
    with pytest.raises(LoomError, match="no earlier version"):
        store.rollback("data")
    alias = store.get_alias(store.find("data"), "current")
    assert alias is not None
    assert [e.action for e in alias.history] == ["set", "set", "set", "rollback", "rollback"]
    with pytest.raises(NotFoundError, match="v9"):
        store.set_alias("data", "champion", "v9")
    with pytest.raises(LoomError, match="shadow"):
        store.set_alias("data", "v1", "v2")


def test_first_version_is_current_later_ones_move_it_only_when_asked(store: Store) -> None:
    _publish_blob(store, "data", b"1", version="v1")
    assert store.resolve("data").version == "v1"
    _publish_blob(store, "data", b"2", version="v2")
    assert store.resolve("data").version == "v1"
    _publish_blob(store, "data", b"3", version="v3", alias="current")
    assert store.resolve("data").version == "v3"


def test_bare_name_without_current_alias_explains(store: Store) -> None:
    _publish_blob(store, "data", b"1", version="v1", alias="champion")  # asked for another alias
    with pytest.raises(NotFoundError, match="alias set data current"):
        store.resolve("data")
    with pytest.raises(NotFoundError, match="available versions: v1"):
        store.resolve("data@v7")


def test_verify_catches_a_flipped_byte_and_loading_refuses(store: Store, tiny_base: str) -> None:
    from loom.models import load_model

    assert all(r.ok for r in verify_store(store))
    weights = store.backend.local_path(store.resolve(tiny_base).rel) / "model.safetensors"
    flip_byte(weights, offset=weights.stat().st_size // 2)
    reports = verify_store(store, tiny_base)
    assert not reports[0].ok and "model.safetensors is corrupted" in reports[0].problems[0]
    # the dry run checks sizes and manifests only, so the flip passes it
    assert verify_store(store, tiny_base, dry_run=True)[0].ok
    with pytest.raises(IntegrityError, match=r"model\.safetensors is corrupted"):
        load_model(tiny_base, store=store)


def test_verify_reports_unexpected_and_missing_files(store: Store) -> None:
    m = _publish_blob(store, "data", b"1", version="v1")
    folder = store.backend.local_path(store.resolve("data@v1").rel)
    (folder / "stray.bin").write_bytes(b"?")
    problems = verify_store(store, "data@v1")[0].problems
    assert any("unexpected file stray.bin" in p for p in problems)
    (folder / m.files[0].path).chmod(0o644)
    (folder / m.files[0].path).unlink()
    assert any("blob.txt is missing" in p for p in verify_store(store, "data@v1")[0].problems)


def test_damaged_manifest_is_reported_not_crashing(store: Store) -> None:
    _publish_blob(store, "data", b"1", version="v1")
    mpath = store.backend.local_path(store.resolve("data@v1").rel) / "manifest.json"
    mpath.chmod(0o644)
    mpath.write_text("{not json")
    reports = verify_store(store)
    assert len(reports) == 1 and "not valid JSON" in reports[0].problems[0]


def test_gc_keep_spares_aliased_versions(store: Store) -> None:
    for i in range(5):
        _publish_blob(store, "data", str(i).encode(), version=f"v{i}")
    store.set_alias("data", "champion", "v0")
    dry = collect(store, keep=2, dry_run=True)
    assert dry.versions == ["data@v1", "data@v2"] and store.versions(store.find("data"))[0] == "v0"
    collect(store, keep=2)
    assert store.versions(store.find("data")) == ["v0", "v3", "v4"]
    assert all(r.ok for r in verify_store(store))


def test_gc_keeps_alias_history_so_rollback_still_works(store: Store) -> None:
    for i in range(4):
        _publish_blob(store, "data", str(i).encode(), version=f"v{i}", alias="current")
    report = collect(store, keep=1)
    assert report.versions == []
    assert report.kept == [
        "dataset data@v0 kept: in alias current's history",
        "dataset data@v1 kept: in alias current's history",
        "dataset data@v2 kept: in alias current's history",
    ]
    assert [store.rollback("data").version for _ in range(3)] == ["v2", "v1", "v0"]
    # rolled all the way back: v1 and v2 are in no history any more, v0 is current
    assert collect(store, keep=1).versions == ["data@v1", "data@v2"]
    assert store.versions(store.find("data")) == ["v0", "v3"]


def test_dataset_files_snapshot(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"text": str(i)}) for i in range(7)) + "\n")
    m, created = snapshot(store, [f], name="ds", version="v1")
    assert created and m.dataset is not None
    assert (m.dataset["rows"], m.dataset["rows_per_source"]) == (7, {"train.jsonl": 7})
    again, created = snapshot(store, [f], name="ds")
    assert not created and again.version == "v1"  # same bytes → same snapshot


def test_store_root_from_model_store_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOM_STORE", raising=False)
    monkeypatch.setenv("MODEL_STORE_ROOT", str(tmp_path / "legacy"))
    assert Store().url == str((tmp_path / "legacy").resolve())
