"""Quantized variants of a base version, cached beside it in the store.

    bases/<name>/versions/<version>/variants/<variant>/manifest.json + weights.safetensors

A variant is made once (``loom store quantize``, or the first ``loom serve`` that asks for
it) and never changes afterwards: like a version it is staged, hashed and made visible by
its manifest, written last. Its manifest (``VariantManifest``) lists its files with their
sha256, the quantization scheme, and the quality check against fp32 (``VariantQuality``).
The base version's own files and manifest are never touched: the base manifest's
``quantized_variants`` says which variants the base offers, ``cached_variants`` which exist.
``verify_version`` checks each variant's files like the version's own.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from loom import __version__
from loom.errors import IntegrityError, LoomError
from loom.store.aliases import current_user
from loom.store.backends import CLAIM
from loom.store.hashing import sha256_stream
from loom.store.manifest import MANIFEST_NAME, BaseInfo, FileEntry, _Strict
from loom.store.store import Resolved, Store

VARIANTS_DIR = "variants"
WEIGHTS_FILE = "weights.safetensors"
# the variants Loom's CPU engine serves (loom.engine.quantized); the *_bnb ones are CUDA-only
CPU_VARIANTS = ("int8", "int4")


class VariantQuality(_Strict):
    """The variant against the fp32 base, teacher-forced along fp32's greedy tokens."""

    reference: str = "float32"
    prompts: int
    tokens: int
    mean_kl: float  # mean over tokens of KL(fp32 || variant) of the next-token distributions, nats
    max_kl: float
    agreement: float  # share of tokens where the variant's top token is fp32's


class VariantManifest(_Strict):
    schema_version: int = 1
    kind: Literal["variant"] = "variant"
    variant: str
    base: str  # name@version of the base version it was made from
    scheme: str  # e.g. "int8 per output channel, bf16 scales"
    group_size: int | None = None
    created_at: datetime
    created_by: str
    files: list[FileEntry]
    weight_bytes: int  # the variant's quantized tensors, scales included
    quality: VariantQuality | None = None

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


def variant_rel(base: Resolved, variant: str) -> str:
    return f"{base.rel}/{VARIANTS_DIR}/{variant}"


def read_variant(store: Store, base: Resolved, variant: str) -> VariantManifest | None:
    """The cached variant's manifest, or None when it has not been made."""
    rel = f"{variant_rel(base, variant)}/{MANIFEST_NAME}"
    if not store.backend.exists(rel):
        return None
    try:
        return VariantManifest.model_validate_json(store.backend.read_bytes(rel))
    except ValueError as exc:
        raise IntegrityError(
            f"{store.url}/{rel}: variant manifest does not validate ({exc}); delete the variant's "
            f"folder and make it again with 'loom store quantize {base.ref} --variant {variant}'"
        ) from None


def cached_variants(store: Store, base: Resolved) -> list[str]:
    found = store.backend.list_dir(f"{base.rel}/{VARIANTS_DIR}")
    return sorted(v for v in found if store.backend.exists(f"{variant_rel(base, v)}/{MANIFEST_NAME}"))


def publish_variant(
    store: Store,
    base: Resolved,
    variant: str,
    fill: Callable[[Path], tuple[str, int | None, int]],
    quality: VariantQuality | None,
) -> VariantManifest:
    """Stage the variant, ``fill(folder)`` writing its files and returning (scheme, group
    size, weight bytes), hash them and make it visible by writing its manifest last."""
    if variant not in CPU_VARIANTS:
        raise LoomError(f"variant {variant!r}: Loom makes {', '.join(CPU_VARIANTS)}")
    rel = variant_rel(base, variant)
    if store.backend.exists(f"{rel}/{MANIFEST_NAME}"):
        raise LoomError(
            f"{base.ref} already has a {variant} variant; variants are immutable (delete its folder "
            f"{store.url}/{rel} to make it again)"
        )
    staging = store.backend.stage(rel)
    try:
        scheme, group_size, weight_bytes = fill(staging.dir)
        manifest = VariantManifest(
            variant=variant,
            base=base.ref,
            scheme=scheme,
            group_size=group_size,
            created_at=datetime.now(timezone.utc),
            created_by=f"{current_user()}@{socket.gethostname()} loom/{__version__}",
            files=Store._hash_payload(staging.dir, None),
            weight_bytes=weight_bytes,
            quality=quality,
        )
        staging.commit(rel, manifest.to_json())
    except BaseException:
        staging.abort()
        raise
    return manifest


def verify_variant(store: Store, base_rel: str, ref: str, variant: str, dry_run: bool) -> list[str]:
    """Problems with one cached variant: its manifest, then every file's size and sha256."""
    rel = f"{base_rel}/{VARIANTS_DIR}/{variant}"
    where = f"{ref} variant {variant}"
    if not store.backend.exists(f"{rel}/{MANIFEST_NAME}"):
        return [f"{where}: no manifest.json (an interrupted quantize?); delete {rel} and quantize again"]
    try:
        manifest = VariantManifest.model_validate_json(store.backend.read_bytes(f"{rel}/{MANIFEST_NAME}"))
    except ValueError as exc:
        return [f"{where}: manifest does not validate ({exc})"]
    problems = []
    present = set(store.backend.list_files(rel)) - {MANIFEST_NAME, CLAIM}
    for extra in sorted(present - {f.path for f in manifest.files}):
        problems.append(f"{where}: unexpected file {extra} (not in its manifest)")
    for f in manifest.files:
        path = f"{rel}/{f.path}"
        if f.path not in present:
            problems.append(f"{where}: file {f.path} is missing")
            continue
        size = store.backend.size(path)
        if size != f.size:
            problems.append(f"{where}: file {f.path} has {size} bytes, its manifest says {f.size}")
            continue
        if not dry_run:
            with store.backend.open_read(path) as fh:
                digest, _ = sha256_stream(fh, None)
            if digest != f.sha256:
                problems.append(
                    f"{where}: file {f.path} is corrupted (sha256 {digest[:12]}…, manifest says "
                    f"{f.sha256[:12]}…); delete {rel} and run 'loom store quantize {ref} --variant {variant}'"
                )
    return problems


def offered_variants(info: BaseInfo) -> list[str]:
    """The CPU variants Loom can make of this base. Manifests written before Loom made its
    own variants list only the bitsandbytes ones; any base with linear weights offers int8,
    and int4 where the projections' input features split into groups of 32."""
    listed = [v for v in info.quantized_variants if v in CPU_VARIANTS]
    if listed or not info.quantized_variants:
        return listed
    arch = info.arch
    int4 = arch.hidden_size % 32 == 0 and arch.intermediate_size % 32 == 0
    return ["int8", "int4"] if int4 else ["int8"]


def variant_weight_bytes(info: BaseInfo, variant: str, group_size: int = 128) -> int:
    """Bytes of a base's weights served as ``variant`` (loom.models.quantize): every layer's
    q/k/v/o/gate/up/down quantized (int4: group-wise bf16 scale + zero per ``group_size``
    inputs; int8: a bf16 scale per output row), the vocabulary projection int8 (a second copy
    when tied to the embeddings), everything else (embeddings, norms, biases) fp32."""
    arch = info.arch
    hidden, inter = arch.hidden_size, arch.intermediate_size
    kv = arch.num_key_value_heads * (hidden // arch.num_attention_heads)
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]
    layer_params = arch.num_hidden_layers * sum(o * i for o, i in shapes)
    head = arch.vocab_size * hidden
    # the manifest counts the stored tensors: an untied lm_head is one of them
    untied = info.parameter_count - layer_params >= 2 * head
    other = info.parameter_count - layer_params - (head if untied else 0)

    def quantized(out: int, inp: int) -> int:
        if variant == "int8":
            return out * inp + out * 2
        group = next((g for g in (group_size, 128, 64, 32) if inp % g == 0), 32)
        return out * inp // 2 + (inp // group) * out * 2 * 2

    layers = arch.num_hidden_layers * sum(quantized(o, i) for o, i in shapes)
    return layers + head + arch.vocab_size * 2 + other * 4
