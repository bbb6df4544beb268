"""Memory of a quantized variant's load: the variant file is read tensor by tensor into
storage of the process's own (``loom.models.tensor_file``), never kept memory-mapped, and
the peak RSS of a load plus one prefill stays within what the serve plan counts for it.
(safetensors' ``load_file`` returns tensors inside a map of the file: its pages stayed in
the RSS beside the merged q/k/v and gate/up copies, and 8-byte-aligned int8 weights crash
torch's kernel: see BENCHMARKS.md, issue 18.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loom.engine.quantized import Int8Weight
from loom.errors import IntegrityError
from loom.models.quantize import load_variant, make_variant, to_tensors
from loom.models.tensor_file import TensorFile
from loom.store import Store
from loom.store.facts import base_facts

SRC = Path(__file__).parents[1] / "src"


def test_tensor_file_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i8": torch.randint(-127, 127, (4, 33), dtype=torch.int8),
        "u8": torch.arange(10, dtype=torch.uint8),
        "i64": torch.tensor(12345678901),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"kind": "test"})
    with TensorFile(path) as fh:
        assert set(fh.names()) == set(tensors) and fh.metadata == {"kind": "test"}
        for name, want in tensors.items():
            got = fh.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
            assert got.data_ptr() % 64 == 0 or got.numel() == 0, name
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(IntegrityError, match="does not hold its"):
        TensorFile(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(IntegrityError, match="not a safetensors file"):
        TensorFile(junk)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(path.read_bytes() + b"\0" * 4)
    with pytest.raises(IntegrityError, match="after the last tensor"):
        TensorFile(trailing)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],  # not an object
        {"a": "F32"},  # an entry that is not an object
        {"a": {"dtype": "F32", "shape": [1]}},  # no offsets
        {"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}},  # negative dims
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},  # float offsets
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        },  # overlap
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},  # a gap before the first tensor
    ],
)
def test_tensor_file_refuses_a_malformed_header(tmp_path: Path, header: object) -> None:
    import json
    import struct

    body = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    with pytest.raises(IntegrityError):
        TensorFile(path)


def test_a_loaded_variant_holds_its_own_aligned_memory_not_the_file(store: Store, tiny_base: str) -> None:
    base = store.resolve(tiny_base)
    make_variant(store, base, "int8", check=False)
    model, *_ = load_variant(store, tiny_base, "int8", allow_lossy=True)
    # (other tests in this process may hold other stores' files mapped: transformers' loads)
    root = str(store.backend.local_path(base.rel))
    mapped = [line for line in Path(f"/proc/{os.getpid()}/maps").read_text().splitlines() if root in line]
    assert not mapped  # neither the variant's weights.safetensors nor the base's model.safetensors
    quantized = [m.loom_quant for m in model.modules() if getattr(m, "loom_quant", None) is not None]
    assert len(quantized) == 2 * 7 + 1  # two layers' projections and the head
    for w in quantized:
        assert w.qweight.data_ptr() % 64 == 0 and w.scales.data_ptr() % 64 == 0


def test_quantized_linear_runs_on_a_weight_that_is_not_64_byte_aligned() -> None:
    """In a subprocess: without the copy, torch's int8 kernel kills the process (SIGSEGV)."""
    code = """
        import torch
        from loom.engine.quantized import Int8Weight, QuantizedLinear, quantize_int8
        w = quantize_int8(torch.randn(64, 64))
        buf = torch.empty(64 * 64 + 128, dtype=torch.int8)
        start = (64 - buf.data_ptr() % 64) % 64 + 24  # 8- but not 32-byte aligned
        q = buf[start : start + 64 * 64].view(64, 64)
        q.copy_(w.qweight)
        assert q.data_ptr() % 64 == 24
        x = torch.randn(5, 64)
        got = QuantizedLinear(Int8Weight(q, w.scales), None)(x)
        want = QuantizedLinear(w, None)(x)
        assert torch.equal(got, want)
        print("ok")
    """
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


# A base of moderate size whose int8 weights (348 MiB) dominate everything else the plan
# counts, so that holding them twice (a mapped file beside copies) cannot fit the plan.
SHAPE = {"hidden": 1024, "intermediate": 4096, "layers": 24, "heads": 16, "kv_heads": 4, "vocab": 4096}


def _moderate_variant(folder: Path) -> tuple[Path, Path]:
    """A base folder (config and weights) and an int8 variant file for it, written directly:
    the values do not matter here, only the bytes."""
    from transformers import MistralConfig

    h, inter, n, vocab = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * h // SHAPE["heads"]
    config = MistralConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=n,
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"],
        vocab_size=vocab,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    base = folder / "base"
    config.save_pretrained(base)
    rest = {"model.embed_tokens.weight": torch.randn(vocab, h) * 0.02, "model.norm.weight": torch.ones(h)}
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h)}
    shapes |= {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    weights = {"lm_head": (vocab, h)}
    for i in range(n):
        rest[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
        rest[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
        part = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"}
        for p, shape in shapes.items():
            weights[f"model.layers.{i}.{part.get(p, 'mlp')}.{p}_proj"] = shape
    # the projections in bf16 as a checkpoint holds them (the plan counts them from the
    # manifest's facts); the load never reads them
    dense = {f"{m}.weight": torch.zeros(shape, dtype=torch.bfloat16) for m, shape in weights.items()}
    save_file(rest | dense, str(base / "model.safetensors"))
    del dense
    quant = {
        m: Int8Weight(torch.randint(-127, 128, s, dtype=torch.int8), torch.full((s[0],), 1e-3).bfloat16())
        for m, s in weights.items()
    }
    variant = folder / "weights.safetensors"
    save_file(to_tensors(quant), str(variant))
    return base, variant


CHILD = """
import json, sys, torch
from pathlib import Path
from loom.engine.runner import ATTN_TARGETS, ModelRunner
from loom.models.quantize import load_quantized_model, read_weights

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
torch.set_num_threads(2)
import transformers.models.mistral.modeling_mistral  # the runtime, imported before measuring
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from the current RSS
model = load_quantized_model(Path(sys.argv[1]), read_weights(Path(sys.argv[2])))
runner = ModelRunner(model, num_slots=1, max_rank=8, targets=ATTN_TARGETS)
cache = runner.new_cache(1 << 40, 64, max_seqs=1)
runner.prefill(cache, 0, [list(range(1, 60))], [-1])
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def test_peak_rss_of_a_quantized_load_and_prefill_stays_within_the_plan(tmp_path: Path) -> None:
    from loom.serve.config import ServeConfig
    from loom.serve.plan import MIB, make_plan

    base, variant = _moderate_variant(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), str(variant)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = ServeConfig(
        device="cpu",
        dtype="int8",
        max_adapters=1,
        max_lora_rank=8,
        max_batch_size=1,
        max_seq_len=64,
        prefix_cache_mb=0,
        memory_mb=100_000,
    )
    info = base_facts(base)  # what import_hf_dir would record
    plan = make_plan(cfg, info.arch, info, "moderate@v1")
    # the load's own growth against what the plan counts beyond the runtime it assumes
    grown_mb = (rss["peak"] - rss["before"]) / MIB
    allowed_mb = plan.total_mb - plan.runtime_mb
    weights_mb = variant.stat().st_size / MIB
    assert weights_mb > 0.6 * allowed_mb  # the test's premise: the weights dominate the plan
    print(f"grew {grown_mb:.0f} MiB of the plan's {allowed_mb} MiB (weights {weights_mb:.0f} MiB)")
    assert grown_mb <= allowed_mb, f"grew {grown_mb:.0f} MiB, plan {allowed_mb} MiB: {plan.describe()}"
