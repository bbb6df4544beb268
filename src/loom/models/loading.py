"""Load a base model plus zero or more adapters, preferring the store.

Weights load from safetensors only (``use_safetensors=True``; pickles are
refused at import time too) and ``trust_remote_code`` stays off unless asked.
A store version is verified against its manifest checksums before loading,
so a corrupted file is refused rather than silently served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loom.config import settings
from loom.errors import CompatibilityError, IntegrityError, LoomError, NotFoundError
from loom.models.device import pick_device, pick_dtype
from loom.refs import Ref, parse_ref
from loom.store import cache
from loom.store.store import Resolved, Store
from loom.store.verify import verify_version


@dataclass
class LoadPlan:
    """What would be loaded, checked from manifests and paths only (no weights read)."""

    base_ref: str
    base_path: str
    base: Resolved | None
    adapters: list[Resolved] = field(default_factory=list)
    adapter_paths: list[str] = field(default_factory=list)
    source: str = "store"  # store, path or hub

    def describe(self) -> dict[str, Any]:
        return {
            "base": self.base_ref,
            "base_path": self.base_path,
            "source": self.source,
            "adapters": [a.ref for a in self.adapters],
            "adapter_paths": self.adapter_paths,
        }


@dataclass
class LoadedModel:
    model: Any  # PreTrainedModel or PeftModel
    tokenizer: Any
    plan: LoadPlan
    device: torch.device
    dtype: torch.dtype


def materialize(store: Store, resolved: Resolved) -> Path:
    """A local folder with the version's files (object stores go through a verified cache)."""
    return cache.materialize(store, resolved)


def resolve_adapter(store: Store, ref: str, base_fingerprint: str | None, base_label: str) -> Resolved:
    """Resolve an adapter ref, refusing other kinds and adapters trained for another base."""
    adapter = store.resolve(ref)
    info = adapter.manifest.adapter
    if adapter.manifest.kind != "adapter" or info is None:
        raise LoomError(f"{ref} is a {adapter.manifest.kind}, not an adapter")
    if base_fingerprint is not None and info.base_fingerprint != base_fingerprint:
        raise CompatibilityError(
            f"adapter {adapter.ref} was trained for base {info.base_ref} "
            f"(fingerprint {info.base_fingerprint}), which does not match {base_label} "
            f"({base_fingerprint}); load it with its own base or retrain it"
        )
    return adapter


def _check(store: Store, resolved: Resolved, dry_run: bool) -> None:
    report = verify_version(store, resolved.artifact, resolved.version, dry_run=dry_run)
    if not report.ok:
        raise IntegrityError(
            f"refusing to load {resolved.ref}: " + "; ".join(report.problems) + " (run 'loom store verify')"
        )


def _resolve_base(store: Store, ref: Ref, strict: bool) -> tuple[Resolved | None, str, str]:
    if ref.kind == "path":
        if not Path(ref.name).is_dir():
            raise NotFoundError(f"{ref.name}: no such model directory")
        return None, ref.name, "path"
    if ref.kind == "store":
        resolved = store.resolve(ref)
        return resolved, "", "store"
    # hub ref: prefer a store copy imported from that hub id
    for summary in store.summaries("base"):
        for v in reversed(summary.versions):
            m = store.manifest(summary.artifact, v)
            if m.source.type == "hub" and m.source.uri == ref.name:
                return store.resolve(f"{m.name}@{v}"), "", "store"
    if strict:
        raise NotFoundError(
            f"{ref} is not in store {store.url} and strict mode forbids hub downloads; "
            f"import it first with 'loom store import-base {ref}'"
        )
    return None, ref.name, "hub"


def plan_load(
    base: str | None = None,
    adapters: list[str] | tuple[str, ...] = (),
    *,
    store: Store | None = None,
    strict: bool = False,
    verify: bool = True,
    dry_run: bool = False,
) -> LoadPlan:
    """Resolve and check everything a load needs; ``dry_run`` skips checksum hashing."""
    store = store or Store()
    base = base or store.default_base()
    if base is None:
        raise NotFoundError(
            f"no base model given and store {store.url} has no default; "
            f"run 'loom store import-base --default' or pass a base ref"
        )
    resolved, where, source = _resolve_base(store, parse_ref(base), strict)
    if resolved is not None:
        if verify or dry_run:
            _check(store, resolved, dry_run)
        where = str(materialize(store, resolved))
    plan = LoadPlan(
        base_ref=resolved.ref if resolved else base, base_path=where, base=resolved, source=source
    )
    base_fp = resolved.manifest.base.fingerprint if resolved and resolved.manifest.base else None
    for text in adapters:
        adapter = resolve_adapter(store, text, base_fp, plan.base_ref)
        if verify or dry_run:
            _check(store, adapter, dry_run)
        plan.adapters.append(adapter)
        plan.adapter_paths.append(str(materialize(store, adapter)))
    return plan


def load_model(
    base: str | None = None,
    adapters: list[str] | tuple[str, ...] = (),
    *,
    store: Store | None = None,
    device: str = "auto",
    dtype: str = "auto",
    strict: bool = False,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> LoadedModel:
    """Load base (+ adapters, named after their refs) ready for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings().dry_run:
        raise LoomError(
            "MODEL_STORE_DRY_RUN/LOOM_DRY_RUN is set: weights are not loaded; use plan_load() "
            "(or 'loom store verify --dry-run') to check paths and manifests"
        )
    plan = plan_load(base, adapters, store=store, strict=strict, verify=verify)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    revision = parse_ref(base).selector if plan.source == "hub" and base else None
    model: Any = AutoModelForCausalLM.from_pretrained(
        plan.base_path,
        dtype=torch_dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        revision=revision,
        local_files_only=plan.source != "hub",
    )
    model.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(
        plan.base_path, trust_remote_code=trust_remote_code, local_files_only=plan.source != "hub"
    )
    if plan.adapters:
        from peft import PeftModel

        for i, (adapter, path) in enumerate(zip(plan.adapters, plan.adapter_paths, strict=True)):
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=adapter.artifact.name)
            else:
                model.load_adapter(path, adapter_name=adapter.artifact.name)
        model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, plan=plan, device=dev, dtype=torch_dtype)
