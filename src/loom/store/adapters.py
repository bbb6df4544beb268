"""Publishing PEFT adapters as store artifacts, checked against their base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loom.errors import CompatibilityError, LoomError
from loom.store.adapter_spec import AdapterSpec
from loom.store.facts import adapter_facts
from loom.store.manifest import Manifest, Source
from loom.store.store import PICKLE_SUFFIXES, Store
from loom.store.verify import tensors_of

# Files a PEFT adapter folder may carry into the store.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_summary.json", "README.md")


def _copy_adapter(src: Path, dest: Path) -> None:
    pickles = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not (src / "adapter_model.safetensors").is_file():
        hint = f" (found pickle files {pickles})" if pickles else ""
        raise LoomError(
            f"{src}: no adapter_model.safetensors{hint}; Loom stores safetensors only: "
            f"save with PeftModel.save_pretrained(dir, safe_serialization=True)"
        )
    for name in ADAPTER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def publish_adapter(
    store: Store,
    path: str | Path,
    *,
    agent: str,
    name: str,
    base: str | None = None,
    training_summary: dict[str, Any] | None = None,
    source: Source | None = None,
    **kw: Any,
) -> Manifest:
    """Publish a PEFT LoRA folder as ``name`` under ``agent``, checked against its base."""
    src = Path(path).expanduser().resolve()
    if not src.is_dir():
        raise LoomError(f"{path}: not a directory; give a PEFT adapter folder")
    base_ref = base or store.default_base()
    if base_ref is None:
        raise LoomError("no --base given and the store has no default base; pass --base REF")
    resolved = store.resolve(base_ref)
    if resolved.manifest.kind != "base" or resolved.manifest.base is None:
        raise LoomError(f"--base {base_ref} is a {resolved.manifest.kind}, not a base model")
    base_info = resolved.manifest.base
    base_tensors = tensors_of(store, resolved.rel, resolved.manifest)
    summary = training_summary
    if summary is None and (src / "training_summary.json").is_file():
        summary = json.loads((src / "training_summary.json").read_text())

    def describe(folder: Path) -> dict[str, Any]:
        # the staged copy is what gets published; errors name the folder the user gave
        spec = AdapterSpec.from_folder(folder, where=str(src), load_tensors=False)
        problems = spec.fit_problems(base_tensors)
        if problems:
            raise CompatibilityError(
                f"adapter {src} does not fit base {resolved.ref}: " + "; ".join(problems[:5])
            )
        return {"adapter": adapter_facts(spec, resolved.ref, base_info), "training_summary": summary}

    return store.publish(
        "adapter",
        name,
        agent=agent,
        fill=lambda d: _copy_adapter(src, d),
        describe=describe,
        source=source or Source(type="local", uri=str(src)),
        **kw,
    )
