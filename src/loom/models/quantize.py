"""Quantized variants of a base: make them (once, cached in the store), check their quality
against fp32, and load a base with their weights for the engine.

What is quantized: every decoder layer's q/k/v/o and gate/up/down projections (int8 per
output channel, or int4 group-wise), and the vocabulary projection, which stays int8 in the
int4 variant too (the usual choice: the logits are the most sensitive product). Embeddings,
norms and biases stay fp32, read from the base version's own files.

Every variant is checked against fp32 when made (``loom.models.quality``) and the result
recorded in its manifest; ``load_variant`` verifies its checksums and applies the guard.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loom.engine.quantized import Int4Weight, Int8Weight, QuantWeight, quantize_int4, quantize_int8
from loom.errors import IntegrityError, LoomError
from loom.models.tensor_file import TensorFile
from loom.store.store import Resolved, Store
from loom.store.variants import (
    CPU_VARIANTS,
    WEIGHTS_FILE,
    VariantManifest,
    publish_variant,
    read_variant,
    variant_rel,
    verify_variant,
)

LAYER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
HEAD = "lm_head"


def quantized_module(tensor_name: str) -> str | None:
    """The module a base tensor's quantized form replaces (``lm_head`` for the head), else None."""
    if LAYER_LINEAR.match(tensor_name):
        return tensor_name.removesuffix(".weight")
    return HEAD if tensor_name == "lm_head.weight" else None


def _base_tensors(base_dir: Path) -> Iterator[tuple[str, TensorFile]]:
    """(name, open file) for every tensor of the base's safetensors files, read one at a time
    (``TensorFile``: no memory map, whose pages would stay in the RSS beside the copies)."""
    for path in sorted(base_dir.glob("*.safetensors")):
        with TensorFile(path) as fh:
            for name in fh.names():
                yield name, fh


def quantize_base(base_dir: Path, variant: str, group_size: int = 128) -> dict[str, QuantWeight]:
    """The variant's weights, one base tensor in memory at a time (plus what is made)."""
    if variant not in CPU_VARIANTS:
        raise LoomError(f"--variant {variant!r}: choose one of {', '.join(CPU_VARIANTS)}")
    out: dict[str, QuantWeight] = {}
    embeddings = None
    for name, fh in _base_tensors(base_dir):
        module = quantized_module(name)
        if name == "model.embed_tokens.weight":
            embeddings = name, fh.get_tensor(name)
        if module is None:
            continue
        weight = fh.get_tensor(name)
        use_int4 = variant == "int4" and module != HEAD
        out[module] = quantize_int4(weight, group_size) if use_int4 else quantize_int8(weight)
    if HEAD not in out:  # tied embeddings: the head is the embedding matrix
        if embeddings is None:
            raise LoomError(f"{base_dir}: neither lm_head.weight nor model.embed_tokens.weight found")
        out[HEAD] = quantize_int8(embeddings[1])
    if len(out) == 1:
        raise LoomError(f"{base_dir}: no decoder projections (model.layers.N.*_proj) to quantize")
    return out


def to_tensors(weights: dict[str, QuantWeight]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for module, w in weights.items():
        tensors[f"{module}.qweight"] = w.qweight
        if isinstance(w, Int8Weight):
            tensors[f"{module}.scales"] = w.scales
        else:
            tensors[f"{module}.scales_zeros"] = w.scales_zeros
    return tensors


def read_weights(path: Path) -> Iterator[tuple[str, QuantWeight]]:
    """The variant file's (module, weight) pairs, each read when asked for into storage of
    its own: nothing else of the file is held meanwhile (see ``TensorFile``)."""
    with TensorFile(path) as fh:
        names = set(fh.names())
        for key in fh.names():
            if not key.endswith(".qweight"):
                continue
            module = key.removesuffix(".qweight")
            if f"{module}.scales" in names:
                yield module, Int8Weight(fh.get_tensor(key), fh.get_tensor(f"{module}.scales"))
            elif f"{module}.scales_zeros" in names:
                q, sz = fh.get_tensor(key), fh.get_tensor(f"{module}.scales_zeros")
                yield module, Int4Weight(q, sz, q.shape[1] * 2 // sz.shape[0])
            else:
                raise IntegrityError(f"{path}: {module} has no scales; re-quantize the variant")


def scheme_of(variant: str, groups: set[int]) -> tuple[str, int | None]:
    """The manifest's scheme text and group size (the largest used: a weight whose input
    features it does not divide takes a smaller one)."""
    if variant == "int8":
        return "int8 weight-only, per output channel, bf16 scales", None
    sizes = "/".join(str(g) for g in sorted(groups))
    return f"int4 weight-only, groups of {sizes} (asymmetric, bf16 scale/zero); lm_head int8", max(groups)


# ---------------------------------------------------------------- loading


def load_quantized_model(
    base_dir: Path, weights: Mapping[str, QuantWeight] | Iterable[tuple[str, QuantWeight]]
) -> Any:
    """The base's HF model with fp32 embeddings/norms/biases from ``base_dir`` and every
    quantized module's dense weight replaced by an empty placeholder and its quantized form
    attached as ``loom_quant`` (read by ``loom.engine.lora.Projection`` and the runner).
    The dense weights are never materialized (the model is built on the meta device), and
    ``weights`` may be ``read_weights``' stream: each is attached as it is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {
        name: fh.get_tensor(name).float()
        for name, fh in _base_tensors(base_dir)
        if quantized_module(name) is None
    }
    model.load_state_dict(state, strict=False, assign=True)
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # its buffers were made on meta
    modules = dict(model.named_modules())
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    for module, w in pairs:
        linear = modules.get(module)
        if not isinstance(linear, nn.Linear):
            raise LoomError(f"{base_dir}: the variant quantizes {module}, which this base does not have")
        linear.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        linear.loom_quant = w  # type: ignore[assignment]
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LoomError(f"{base_dir}: the variant and the base together lack {left[:5]}; re-quantize it")
    return model.eval()


def variant_file(store: Store, base: Resolved, manifest: VariantManifest) -> Path:
    """A local path to the variant's weights (a temporary copy for object stores)."""
    rel = f"{variant_rel(base, manifest.variant)}/{WEIGHTS_FILE}"
    local = store.backend.local_path(rel)
    if local is not None:
        return local
    tmp = Path(tempfile.mkdtemp(prefix="loom-variant-")) / WEIGHTS_FILE
    with store.backend.open_read(rel) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    return tmp


# ---------------------------------------------------------------- make once, load many times


def make_variant(
    store: Store, base: Resolved, variant: str, group_size: int = 128, check: bool = True
) -> VariantManifest:
    """Quantize ``base`` into ``variant``, measure it against fp32 (unless ``check`` is off),
    and publish it beside the base version."""
    from safetensors.torch import save_file

    from loom.models import quality
    from loom.models.loading import load_model, materialize

    base_dir = materialize(store, base)
    weights = quantize_base(base_dir, variant, group_size)
    measured = None
    if check:
        loaded = load_model(base.ref, store=store, device="cpu", dtype="float32")
        ids = quality.prompt_ids(loaded.tokenizer)
        tokens, ref = quality.greedy_logprobs(loaded.model, ids, quality.GUARD_NEW_TOKENS)
        del loaded  # fp32 and the variant are never held together
        test = quality.forced_logprobs(load_quantized_model(base_dir, weights), ids, tokens)
        measured = quality.compare(ref, test, tokens)
    groups = {w.group_size for w in weights.values() if isinstance(w, Int4Weight)}
    scheme, group = scheme_of(variant, groups)

    def fill(folder: Path) -> tuple[str, int | None, int]:
        meta = {"format": "pt", "loom_variant": variant, "base": base.ref}
        save_file(to_tensors(weights), str(folder / WEIGHTS_FILE), metadata=meta)
        return scheme, group, sum(w.nbytes for w in weights.values())

    return publish_variant(store, base, variant, fill, measured)


def load_variant(
    store: Store, base_ref: str, variant: str, allow_lossy: bool = False
) -> tuple[Any, Any, str, str | None, list[str]]:
    """(model, tokenizer, base ref, fingerprint, notes) for serving ``variant`` of ``base_ref``:
    the base and the variant verified against their checksums, the variant made first when
    it is not cached yet, and refused when over the quality bounds unless ``allow_lossy``."""
    from transformers import AutoTokenizer

    from loom.models import quality
    from loom.models.loading import plan_load

    plan = plan_load(base_ref, store=store)  # hashes the base's files
    base = plan.base
    if base is None or base.manifest.base is None:
        raise LoomError(f"{base_ref}: quantized variants are made of store bases; import it first")
    notes = []
    manifest = read_variant(store, base, variant)
    if manifest is None:
        # one maker at a time: a second server starting meanwhile waits, then reads the cached one
        with store.backend.lock(f"{base.rel}/variants/{variant}"):
            manifest = read_variant(store, base, variant)
            if manifest is None:
                manifest = make_variant(store, base, variant)
                notes.append(f"{variant} variant of {base.ref} made on first load and cached in the store")
    problems = verify_variant(store, base.rel, base.ref, variant, dry_run=False)
    if problems:
        raise IntegrityError(f"refusing to load {base.ref} as {variant}: " + "; ".join(problems))
    lossy = quality.check_quality(manifest, allow_lossy)
    if lossy:
        notes.append(lossy)
    base_dir = Path(plan.base_path)
    model = load_quantized_model(base_dir, read_weights(variant_file(store, base, manifest)))
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    return model, tokenizer, base.ref, base.manifest.base.fingerprint, notes
