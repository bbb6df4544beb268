"""The per-version ``manifest.json``: what a version is, where it came from, its files.

A manifest is written last in a publish and never changed afterwards; it is
the only source of truth for a version (no second database).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom.errors import IntegrityError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

Kind = Literal["base", "adapter", "dataset"]
KINDS: tuple[Kind, ...] = ("base", "adapter", "dataset")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    path: str
    size: int
    sha256: str


class Source(_Strict):
    type: Literal["hf_dir", "hub", "gguf", "default", "local", "training_run"]
    uri: str
    revision: str | None = None


class ArchitectureFacts(_Strict):
    """The shape facts an adapter must agree with (and the fingerprint's input)."""

    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None = None


class BaseInfo(_Strict):
    arch: ArchitectureFacts
    fingerprint: str
    parameter_count: int
    dtype: str
    weight_bytes: int
    approx_vram_mb: int
    variant_vram_mb: dict[str, int]
    quantized_variants: list[str]
    peft_support: bool
    default_target_modules: list[str]
    recommended_use_cases: list[str]
    chat_template_sha256: str | None
    has_chat_template: bool


class AdapterInfo(_Strict):
    base_ref: str
    base_fingerprint: str
    peft_type: str
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]
    parameter_count: int
    approx_vram_mb: int
    chat_template_sha256: str | None = None


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    kind: Kind
    name: str
    version: str
    agent: str | None = None
    created_at: datetime
    created_by: str
    source: Source
    license: str | None = None
    description: str | None = None
    status: Literal["ready", "deprecated", "rejected"] = "ready"
    tags: list[str] = Field(default_factory=list)
    files: list[FileEntry]
    base: BaseInfo | None = None
    adapter: AdapterInfo | None = None
    dataset: dict[str, Any] | None = None
    training_summary: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and validate manifest bytes; errors name the manifest's location."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{where}: manifest is not valid JSON ({exc}); the version is damaged") from None
    if isinstance(raw, dict) and raw.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise IntegrityError(
            f"{where}: manifest schema_version {raw['schema_version']} is newer than this Loom "
            f"understands ({SCHEMA_VERSION}); upgrade Loom"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise IntegrityError(f"{where}: manifest does not validate: {exc}") from None
