"""Facts computed from the bytes of a model (never typed by hand).

Sizes and parameter counts come from safetensors headers (the first few KB
of each file), so they are cheap for 7B models and work on object stores.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from loom.errors import LoomError
from loom.store.hashing import sha256_bytes
from loom.store.manifest import AdapterInfo, ArchitectureFacts, BaseInfo

if TYPE_CHECKING:  # adapter_spec builds on this module
    from loom.store.adapter_spec import AdapterSpec

MIB = 1024 * 1024
# Runtime overhead over raw weights (allocator slack, activations at batch 1,
# CUDA context is not included). Serving budgets the KV cache separately.
RUNTIME_OVERHEAD = 1.10

DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

TensorInfo = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def read_safetensors_header(stream: BinaryIO, where: str) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors header, without the data."""
    head = stream.read(8)
    if len(head) != 8:
        raise LoomError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", head)
    if length > 100 * MIB:
        raise LoomError(f"{where}: not a safetensors file (header length {length} is absurd)")
    try:
        header = json.loads(stream.read(length))
    except ValueError as exc:
        raise LoomError(f"{where}: safetensors header is not JSON ({exc})") from None
    return {
        name: (info["dtype"], tuple(info["shape"])) for name, info in header.items() if name != "__metadata__"
    }


def read_dir_tensors(folder: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            tensors.update(read_safetensors_header(fh, str(path)))
    return tensors


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def chat_template_of(folder: Path) -> str | None:
    """The chat template as transformers saves it (own file, or in tokenizer_config)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # named templates: hash them all, stably
            return json.dumps(template, sort_keys=True)
    return None


def architecture_facts(config: dict[str, Any]) -> ArchitectureFacts:
    text_cfg = config.get("text_config", config)
    try:
        heads = int(text_cfg["num_attention_heads"])
        return ArchitectureFacts(
            architecture=(config.get("architectures") or ["unknown"])[0],
            model_type=str(config.get("model_type", "unknown")),
            hidden_size=int(text_cfg["hidden_size"]),
            num_hidden_layers=int(text_cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(text_cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(text_cfg.get("intermediate_size", 0)),
            vocab_size=int(text_cfg["vocab_size"]),
            max_position_embeddings=text_cfg.get("max_position_embeddings"),
        )
    except KeyError as exc:
        raise LoomError(f"config.json has no {exc.args[0]!r}: is this a causal language model?") from None


def fingerprint(arch: ArchitectureFacts, chat_template_sha256: str | None) -> str:
    """What an adapter depends on: architecture, hidden sizes and the chat template."""
    payload = arch.model_dump()
    payload.pop("max_position_embeddings", None)
    payload["chat_template_sha256"] = chat_template_sha256
    return "fp-" + sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:16]


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and "embed" not in name and "lm_head" not in name


def _quantized_variants(arch: ArchitectureFacts) -> list[str]:
    int4 = arch.hidden_size % 32 == 0 and arch.intermediate_size % 32 == 0  # int4 groups of >= 32
    return ["int8", *(["int4"] if int4 else []), "int8_bnb", "nf4_bnb"]


def _use_cases(params: int) -> list[str]:
    if params < 1_000_000_000:
        return ["tests", "classification", "extraction", "routing", "short structured answers"]
    if params < 10_000_000_000:
        return ["chat", "agents", "json tools", "summarisation", "retrieval QA"]
    return ["chat", "agents", "reasoning", "long-form writing"]


def base_facts(folder: Path) -> BaseInfo:
    """Compute the manifest's base-model facts from a saved HF model folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LoomError(f"{folder}: no config.json; a base model needs a Hugging Face config")
    arch = architecture_facts(json.loads(config_path.read_text()))
    tensors = read_dir_tensors(folder)
    if not tensors:
        raise LoomError(f"{folder}: no *.safetensors weights found")
    params = sum(numel(s) for _d, s in tensors.values())
    weight_bytes = sum(numel(s) * DTYPE_BYTES.get(d, 4) for d, s in tensors.values())
    linear = sum(numel(s) for n, (_d, s) in tensors.items() if _is_linear_weight(n, s))
    other = params - linear
    dtypes = sorted({d for d, _s in tensors.values()})
    main_dtype = max(dtypes, key=lambda d: sum(numel(s) for dd, s in tensors.values() if dd == d))

    def mb(nbytes: float) -> int:
        return math.ceil(nbytes * RUNTIME_OVERHEAD / MIB)

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    targets = list(PEFT.get(arch.model_type, []))
    template = chat_template_of(folder)
    template_sha = sha256_bytes(template.encode()) if template else None
    return BaseInfo(
        arch=arch,
        fingerprint=fingerprint(arch, template_sha),
        parameter_count=params,
        dtype=TORCH_DTYPE_NAMES.get(main_dtype, main_dtype.lower()),
        weight_bytes=weight_bytes,
        approx_vram_mb=mb(weight_bytes),
        variant_vram_mb={
            "float32": mb(params * 4),
            "bfloat16": mb(params * 2),
            # bitsandbytes quantizes linear layers only; the rest stays 16-bit.
            "int8_bnb": mb(linear * 1 + other * 2),
            "nf4_bnb": mb(linear * 0.5 + linear / 64 * 4 + other * 2),
        },
        # int8/int4: Loom's CPU variants, made on demand (loom.store.variants); *_bnb: CUDA
        quantized_variants=_quantized_variants(arch) if linear else [],
        peft_support=bool(targets),
        default_target_modules=targets,
        recommended_use_cases=_use_cases(params),
        chat_template_sha256=template_sha,
        has_chat_template=template is not None,
    )


def adapter_facts(spec: AdapterSpec, base_ref: str, base: BaseInfo) -> AdapterInfo:
    """Facts of a parsed adapter (``AdapterSpec``) for the manifest: ``r`` is the largest rank of
    any module (what serving must hold), targets the module names the tensors really adapt."""
    return AdapterInfo(
        base_ref=base_ref,
        base_fingerprint=base.fingerprint,
        peft_type="LORA",
        r=spec.rank,
        alpha=spec.alpha,
        dropout=spec.dropout,
        target_modules=spec.targets,
        parameter_count=spec.parameter_count,
        approx_vram_mb=max(1, math.ceil(spec.nbytes * RUNTIME_OVERHEAD / MIB)),
        chat_template_sha256=base.chat_template_sha256,
    )
