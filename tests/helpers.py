"""Builders for tiny, random, real-architecture models used across tests (offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loom.testing import make_tiny_model, make_tokenizer

ADAPTERS = {  # the engine store's adapters, name: (seed, rank, targets)
    "qv4": (11, 4, ("q_proj", "v_proj")),
    "all8": (12, 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "o2": (13, 2, ("o_proj",)),
}


def make_tiny_mistral(folder: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a randomly initialised MistralForCausalLM (real Mistral code) + tokenizer."""
    model = make_tiny_model(seed, hidden, layers)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return folder


def make_lora_adapter(
    base_folder: Path,
    folder: Path,
    seed: int = 1,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A PEFT LoRA adapter with non-zero B so it really changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def import_retemplated_base(store, base_ref: str, tmp: Path, name: str) -> str:  # type: ignore[no-untyped-def]
    """Import a copy of ``base_ref`` whose chat template differs: same shapes, new fingerprint."""
    import json
    import shutil

    from loom.store.importers import import_hf_dir

    other = tmp / name
    shutil.copytree(store.backend.local_path(store.resolve(base_ref).rel), other)
    for p in other.iterdir():
        p.chmod(0o644)
    (other / "manifest.json").unlink()
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    m = import_hf_dir(store, other, name, version="v1")
    return f"{m.name}@{m.version}"


def tiny_engine(store: Any, **config: int) -> Any:  # Engine on the store's "tiny" base
    from loom.engine import Engine

    return Engine.from_store("tiny", device="cpu", store=store, **config)
