"""A random-weight base of a real architecture's shape, imported into the store.

    python benchmarks/random_base.py --shape mistral-7b            # 7.2B params, bf16, ~15 GB
    python benchmarks/random_base.py --shape smollm2-135m          # the default base's shape
    python benchmarks/engine.py --base mistral-7b-random --device cuda --dtype bfloat16

For measuring speed and memory at production shapes where the real weights cannot
be downloaded (the GPU machines reach no hub). The tokenizer and chat template are
borrowed from ``--tokenizer DIR`` or the store's default base; the vocabulary is the larger of the shape's
and the tokenizer's so every token id has a row. Weights are N(0, 0.02), norms 1,
written shard by shard so the whole model is never held in fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from loom.store import Store

SHAPES: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.3's config (sliding window off, as from v0.2)
    "mistral-7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
    },
    # SmolLM2-135M-Instruct's config (the default base, a Llama; the same math as Mistral
    # with no sliding window): its shape on a GPU machine, where the real weights are
    # more than a command can carry
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    # small enough for a test
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 2048,
    },
}
SHARD_BYTES = 4 * 2**30


def write_random_mistral(
    folder: Path, shape: str, tokenizer_dir: Path, dtype: torch.dtype, seed: int = 0
) -> int:
    """Write config, sharded safetensors and the borrowed tokenizer; returns the parameter count."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(SHAPES[shape])
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    tied = bool(spec.pop("tie_word_embeddings", False))
    config = MistralConfig(
        **spec,
        architectures=["MistralForCausalLM"],
        sliding_window=None,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MistralForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"  # randn for 7B is minutes on CPU
    gen = torch.Generator(gen_device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total = 0, 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for key, size in shapes.items():
        if tied and key == "lm_head.weight":
            continue  # the embeddings' weight, as in the real checkpoint
        if key.endswith("norm.weight"):
            t = torch.ones(size, dtype=dtype)
        else:
            t = (torch.randn(size, generator=gen, device=gen_device) * 0.02).to(dtype).cpu()
        shard[key] = t
        shard_bytes += t.numel() * t.element_size()
        total += t.numel()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    if len(files) > 1:  # rename to the model-0000i-of-0000n convention, with its index
        named = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
        for old, new in named.items():
            (folder / old).rename(folder / new)
        total_size = sum((folder / f).stat().st_size for f in named.values())  # header bytes included
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": {k: named[v] for k, v in weight_map.items()},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    elif files:
        (folder / files[0]).rename(folder / "model.safetensors")
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def make_random_base(
    store: Store, shape: str, name: str, dtype: torch.dtype, seed: int = 0, tokenizer: Path | None = None
) -> str:
    """Create (once) and import the random base; returns its ref. The tokenizer comes
    from `tokenizer` (a folder) or else the store's default base."""
    from loom.models.loading import plan_load
    from loom.store.importers import import_hf_dir

    if any(s.artifact.name == name for s in store.summaries("base")):
        return f"{name}@v1"
    tokenizer_dir = tokenizer or Path(plan_load(None, store=store, verify=False).base_path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, name)
        n = write_random_mistral(folder, shape, tokenizer_dir, dtype, seed)
        print(f"{name}: {n / 1e9:.2f}B parameters ({shape} shape, random), importing ...", flush=True)
        import_hf_dir(store, folder, name, version="v1", alias="current")
    return f"{name}@v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    ap.add_argument("--name", default=None, help="base name in the store (default: <shape>-random)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the default base's)"
    )
    args = ap.parse_args()
    name = args.name or f"{args.shape}-random"
    print(make_random_base(Store(), args.shape, name, getattr(torch, args.dtype), tokenizer=args.tokenizer))


if __name__ == "__main__":
    main()
