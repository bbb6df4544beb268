"""``loom export merged``: an adapter folded into its base (PEFT's ``merge_and_unload``),
published as a new base version with its lineage.

The merge runs in float32 and is saved in the base's stored dtype. Before the version
becomes visible, the saved files are loaded back and their logits compared with the base
plus the (unmerged) adapter on a few prompts; a merge outside the tolerance is refused
and nothing is published.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loom.errors import LoomError
from loom.export.source import resolve_adapter
from loom.store.facts import base_facts
from loom.store.manifest import Manifest, Source
from loom.store.store import Store

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Play some music by the Beatles.",
    "What is the weather like in Paris tomorrow?",
)
# Largest |merged - (base + adapter)| allowed, relative to the largest |logit|: float32 storage
# differs only by summation order; 16-bit storage rounds every merged weight once.
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Weights are saved; everything else a tokenizer or generation needs is copied byte for byte.
_MODEL_FILES = ("config.json", "manifest.json")


@dataclass
class MergeCheck:
    """The logits comparison a merged version passed (kept in its manifest's description)."""

    prompts: int
    max_abs_error: float
    max_abs_logit: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance * max(1.0, self.max_abs_logit)


def _logits(model: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in batches]


def _copy_tokenizer_files(base: Path, dest: Path) -> None:
    for p in base.iterdir():
        is_weights = p.name.endswith((".safetensors", ".safetensors.index.json"))
        if p.is_file() and not is_weights and p.name not in _MODEL_FILES:
            shutil.copy2(p, dest / p.name)


def stored_dtype_of(folder: Path) -> torch.dtype:
    """The dtype the base's config says its weights are stored in (float32 when unsaid)."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge_into(base_folder: Path, adapter_folder: Path, dest: Path, prompts: tuple[str, ...]) -> MergeCheck:
    """Merge, save into ``dest``, load ``dest`` back and compare logits; raise if they differ."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder, local_files_only=True)
    batches = [torch.tensor([tokenizer(p).input_ids]) for p in prompts]
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32, use_safetensors=True)
    stored_dtype = stored_dtype_of(base_folder)
    peft_model = PeftModel.from_pretrained(base, str(adapter_folder)).eval()
    expected = _logits(peft_model, batches)
    merged = peft_model.merge_and_unload()
    merged.to(stored_dtype).save_pretrained(dest, safe_serialization=True)
    del merged, peft_model, base
    _copy_tokenizer_files(base_folder, dest)
    reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32, use_safetensors=True).eval()
    got = _logits(reloaded, batches)
    check = MergeCheck(
        prompts=len(prompts),
        max_abs_error=max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True)),
        max_abs_logit=max(e.abs().max().item() for e in expected),
        tolerance=REL_TOLERANCE.get(stored_dtype, 5e-2),
    )
    if not check.ok:
        raise LoomError(
            f"the merged model's logits differ from base + adapter by {check.max_abs_error:.3g} "
            f"(allowed {check.tolerance:g} x max(1, {check.max_abs_logit:.3g})); nothing was "
            f"published. Check that the adapter loads with PEFT on its base, or serve it unmerged"
        )
    return check


def export_merged(
    store: Store,
    adapter_ref: str,
    name: str,
    *,
    version: str | None = None,
    alias: str | None = None,
    prompts: tuple[str, ...] = PROMPTS,
) -> tuple[Manifest, MergeCheck]:
    """``loom export merged``: publish base + adapter ``adapter_ref`` as the base ``name``."""
    if not prompts:
        raise LoomError("the merge check needs at least one prompt")
    adapter, adapter_folder, base, base_folder = resolve_adapter(store, adapter_ref, "merged")
    checks: list[MergeCheck] = []

    def fill(dest: Path) -> None:
        checks.append(merge_into(base_folder, adapter_folder, dest, prompts))

    def describe(dest: Path) -> dict[str, Any]:
        return {"base": base_facts(dest)}

    manifest = store.publish(
        "base",
        name,
        fill=fill,
        describe=describe,
        source=Source(type="local", uri=f"merge:{base.ref}+{adapter.ref}"),
        version=version,
        alias=alias,
        license=base.manifest.license,
        description=(
            f"{base.ref} merged with adapter {adapter.ref} by 'loom export merged' (logits checked "
            f"against base + adapter on {len(prompts)} prompts before publishing)"
        ),
        tags=["merged", f"base={base.ref}", f"adapter={adapter.ref}"],
    )
    return manifest, checks[0]
