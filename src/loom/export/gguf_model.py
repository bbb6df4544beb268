"""``loom export gguf``: a base (or merged) model as one GGUF file for llama.cpp, Ollama, phones.

Weights are read tensor by tensor from the safetensors files, renamed with gguf's
``TensorNameMap``, Q/K rows reordered for llama.cpp, and stored as the chosen type with
gguf's quantizers. As llama.cpp's converter does, 1-D tensors (norms, biases) stay F32 and a
matrix whose rows do not split into quantization blocks falls back to F16. For q4_0 the
output projection is kept at Q8_0: the last matmul decides every token, and llama.cpp's
own quantizer also gives it a higher-precision type.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from loom.errors import LoomError
from loom.export.gguf_arch import ArchInfo, read_arch, rope_theta
from loom.export.gguf_vocab import add_tokenizer
from loom.export.source import ExportResult, atomic_output, check_output_file, resolve_base
from loom.store.store import Store

Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


def check_type(qtype: str) -> str:
    if qtype not in GGUF_TYPES:
        raise LoomError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    return qtype


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, tied: bool) -> gguf.GGMLQuantizationType:
    """The type one tensor is stored as, under the file type ``qtype``."""
    wanted = GGUF_TYPES[qtype][0]
    if len(shape) < 2 or wanted == Q.F32:
        return Q.F32
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if wanted == Q.Q4_0 and is_output:
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def hf_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the checkpoint as float32 numpy, one at a time (bf16 included)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoomError(f"{folder}: no *.safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, fh.get_tensor(key).float().numpy()


def gguf_tensors(folder: Path, info: ArchInfo, qtype: str) -> Iterator[tuple[str, np.ndarray, Q]]:
    """(GGUF name, stored data, type) for every tensor of the model."""
    for hf_name, data in hf_tensors(folder):
        name = info.tensor_name(hf_name)
        if name is None:
            continue
        data = info.to_llama_rows(name, data)
        kind = tensor_type(name, data.shape, qtype, info.tied)
        if kind == Q.F32:
            yield name, data.astype(np.float32), kind
        elif kind == Q.F16:
            yield name, data.astype(np.float16), kind
        else:
            yield name, gguf.quants.quantize(data, kind), kind


def add_hparams(writer: gguf.GGUFWriter, info: ArchInfo, ftype: gguf.LlamaFileType) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for a Llama-family model."""
    c = info.config
    writer.add_context_length(int(c.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_block_count(info.n_layer)
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(info.n_head)
    writer.add_head_count_kv(info.n_head_kv)
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps") or 1e-6))
    writer.add_rope_freq_base(rope_theta(c))
    writer.add_vocab_size(int(c["vocab_size"]))
    if info.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(info.head_dim)
    if info.head_dim != int(c["hidden_size"]) // info.n_head:
        writer.add_key_length(info.head_dim)
        writer.add_value_length(info.head_dim)
    writer.add_file_type(ftype)


def write_gguf(folder: Path, out: Path, qtype: str = "f16", name: str | None = None) -> list[str]:
    """Write the model in ``folder`` to ``out`` (written in place: see ``export_gguf`` for the
    atomic, checked version). Returns notes for the user."""
    info = read_arch(folder)
    check_type(qtype)
    # A spooled temp file holds the tensors until the header is written: memory stays bounded.
    writer = gguf.GGUFWriter(out, info.name, use_temp_file=True)
    writer.add_name(name or folder.name)
    add_hparams(writer, info, GGUF_TYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes = add_tokenizer(writer, folder, int(info.config["vocab_size"]))
    window = info.config.get("sliding_window")
    if window and window < int(info.config.get("max_position_embeddings") or 0):
        notes.append(
            f"sliding_window {window} is not written: llama.cpp's llama architecture attends to the "
            f"whole context, which matches the original only up to {window} tokens"
        )
    for tensor_name, data, kind in gguf_tensors(folder, info, qtype):
        writer.add_tensor(tensor_name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes


def export_gguf(
    store: Store, ref: str, out: Path, qtype: str = "f16", *, force: bool = False
) -> ExportResult:
    """``loom export gguf``: the base or merged model ``ref`` as a GGUF file of type ``qtype``."""
    check_type(qtype)
    out = check_output_file(Path(out), ".gguf", force)
    resolved, folder = resolve_base(store, ref, "gguf")
    with atomic_output(out) as tmp:
        notes = write_gguf(folder, tmp, qtype, name=resolved.artifact.name)
    return ExportResult(files=[str(out)], sources=[resolved.ref], notes=notes)
