"""``loom export gguf-lora``: a LoRA adapter in llama.cpp's adapter GGUF format.

The format, as llama.cpp's convert_lora_to_gguf.py writes it and ``llama-server --lora``
reads it: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
the base's ``general.architecture``, and for each adapted weight ``<base tensor name>.lora_a``
(numpy ``[rank, in]``) and ``.lora_b`` (``[out, rank]``), with B's rows reordered like the
base's Q/K rows. llama.cpp scales every pair by ``alpha / rank`` (rank from the tensor), so
a module whose PEFT scale differs (rsLoRA, ``alpha_pattern``) has the ratio folded into B.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from loom.errors import LoomError
from loom.export.gguf_arch import read_arch
from loom.export.source import ExportResult, atomic_output, check_output_file, resolve_adapter
from loom.store.adapter_spec import AdapterSpec
from loom.store.store import Store

LORA_TYPES = {
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}


def lora_pairs(spec: AdapterSpec, base_folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(GGUF base tensor name, A, B) per adapted module, B already scaled and reordered."""
    info = read_arch(base_folder)
    pairs = []
    for module, lora in sorted(spec.modules.items()):
        a, b = (t.float().numpy() for t in lora.tensors())
        name = info.tensor_name(f"{module}.weight")
        if name is None:
            raise LoomError(f"{spec.where}: LoRA on {module}, which llama.cpp's model does not have")
        llama_scale = spec.alpha / lora.rank
        if not np.isclose(lora.scale, llama_scale, rtol=0, atol=0):
            b = b * np.float32(lora.scale / llama_scale)
        pairs.append((name, a, info.to_llama_rows(name, b)))
    return pairs


def write_lora_gguf(
    adapter_folder: Path, base_folder: Path, out: Path, *, name: str, dtype: str = "f32"
) -> None:
    """Write the adapter in ``adapter_folder`` (for the base in ``base_folder``) to ``out``."""
    if dtype not in LORA_TYPES:
        raise LoomError(f"LoRA GGUF type {dtype!r} is not supported; choose one of {', '.join(LORA_TYPES)}")
    spec = AdapterSpec.from_folder(adapter_folder)
    info = read_arch(base_folder)
    np_type, ftype = LORA_TYPES[dtype]
    writer = gguf.GGUFWriter(out, info.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, spec.alpha)
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for base_name, a, b in lora_pairs(spec, base_folder):
        writer.add_tensor(f"{base_name}.lora_a", a.astype(np_type))
        writer.add_tensor(f"{base_name}.lora_b", b.astype(np_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_lora_gguf(
    store: Store, ref: str, out: Path, *, dtype: str = "f32", force: bool = False
) -> ExportResult:
    """``loom export gguf-lora``: the adapter ``ref`` as a llama.cpp LoRA GGUF (use it with the
    GGUF of its base: ``llama-server -m base.gguf --lora out.gguf``)."""
    out = check_output_file(Path(out), ".gguf", force)
    adapter, adapter_folder, base, base_folder = resolve_adapter(store, ref, "gguf-lora")
    with atomic_output(out) as tmp:
        write_lora_gguf(adapter_folder, base_folder, tmp, name=adapter.artifact.name, dtype=dtype)
    note = f"load it on the GGUF of its base {base.ref} ('loom export gguf {base.ref} -o base.gguf')"
    return ExportResult(files=[str(out)], sources=[adapter.ref, base.ref], notes=[note])
