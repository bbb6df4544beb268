"""Exports out of the store: merged bases, GGUF files for llama.cpp, LoRA GGUFs, Ollama Modelfiles.

Each export reads verified store versions and writes either a new store version
(``export_merged``) or files outside the store, written under a temporary name and
renamed into place, so a failed export never leaves a half-written file.
"""

from __future__ import annotations

from loom.export.gguf_lora import export_lora_gguf, write_lora_gguf
from loom.export.gguf_model import GGUF_TYPES, export_gguf, write_gguf
from loom.export.merged import MergeCheck, export_merged
from loom.export.ollama import OllamaDefaults, export_ollama, modelfile_template
from loom.export.source import ExportResult

__all__ = [
    "GGUF_TYPES",
    "ExportResult",
    "MergeCheck",
    "OllamaDefaults",
    "export_gguf",
    "export_lora_gguf",
    "export_merged",
    "export_ollama",
    "modelfile_template",
    "write_gguf",
    "write_lora_gguf",
]
