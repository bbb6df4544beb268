"""Hugging Face checkpoint → llama.cpp architecture: which arch, tensor names, Q/K row order.

Facts taken from llama.cpp's convert_hf_to_gguf.py (Loom's own code):
- ``LlamaForCausalLM`` and ``MistralForCausalLM`` both become the ``llama`` architecture;
  ``Qwen2ForCausalLM`` becomes ``qwen2``;
- for ``llama``, the rows of the Q and K projections are permuted from Hugging Face's
  rotate-half RoPE layout to llama.cpp's interleaved one (per head: pairs (i, i+d/2) become
  neighbours); ``qwen2`` keeps the Hugging Face order (llama.cpp uses NEOX RoPE there);
- tensor names come from gguf's ``TensorNameMap``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from loom.errors import LoomError

ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}


@dataclass(frozen=True)
class ArchInfo:
    """The config facts a GGUF writer needs, read from ``config.json``."""

    hf_architecture: str
    arch: gguf.MODEL_ARCH
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.n_head)

    @property
    def n_layer(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.n_head)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name of a Hugging Face tensor (``None``: not part of the GGUF model)."""
        if hf_name.endswith("rotary_emb.inv_freq") or (self.tied and hf_name == "lm_head.weight"):
            return None
        name = gguf.get_tensor_name_map(self.arch, self.n_layer).get_name(
            hf_name, try_suffixes=(".weight", ".bias")
        )
        if name is None:
            raise LoomError(
                f"tensor {hf_name} of this {self.hf_architecture} has no llama.cpp name; the "
                f"checkpoint is not a plain {self.hf_architecture}: use llama.cpp's convert_hf_to_gguf.py"
            )
        return name

    def to_llama_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """Reorder the output rows of Q/K (weights, biases or LoRA B) for llama.cpp's RoPE."""
        if self.arch != gguf.MODEL_ARCH.LLAMA:
            return rows
        if ".attn_q." in gguf_name:
            return permute_rows(rows, self.n_head)
        if ".attn_k." in gguf_name:
            return permute_rows(rows, self.n_head_kv)
        return rows


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Per head, rows [0..d/2) and [d/2..d) become interleaved (llama.cpp's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_arch(folder: Path) -> ArchInfo:
    """The architecture of the model in ``folder``; unsupported ones are refused."""
    path = folder / "config.json"
    if not path.is_file():
        raise LoomError(f"{folder}: no config.json; not a Hugging Face model folder")
    config = json.loads(path.read_text())
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise LoomError(
            f"{folder}: architecture {hf_arch} is not supported by Loom's GGUF export (supported: "
            f"{', '.join(ARCHITECTURES)}); use llama.cpp's convert_hf_to_gguf.py for it"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise LoomError(
            f"{folder}: RoPE scaling {rope_type!r} is not supported by Loom's GGUF export; "
            f"use llama.cpp's convert_hf_to_gguf.py for this model"
        )
    return ArchInfo(hf_arch, ARCHITECTURES[hf_arch], config)


def rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
