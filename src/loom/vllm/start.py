"""``loom serve --backend vllm``: from Loom's serving plan to a running, supervised vLLM."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from loom.errors import LoomError
from loom.serve.plan import ServePlan
from loom.store.store import Store
from loom.store.variants import CPU_VARIANTS
from loom.vllm.launch import VLLMLaunch, kv_cache_gib, vllm_dtype, vllm_rank
from loom.vllm.options import VLLMOptions


def launch_for(plan: ServePlan, base_dir: Path, opts: VLLMOptions, python: str) -> VLLMLaunch:
    """vLLM's settings from the same plan Loom's engine would run (one plan, two engines)."""
    from loom.serve.server import free_port

    return VLLMLaunch(
        python=python,
        model_dir=base_dir,
        served_name=plan.base_ref,
        port=opts.port or free_port(),
        dtype=vllm_dtype(plan.dtype),
        max_model_len=plan.max_seq_len,
        max_num_seqs=plan.max_batch_size,
        max_loras=max(1, min(plan.adapter_slots, plan.max_batch_size)),  # LoRAs in one batch (vLLM: >= 1)
        max_lora_rank=vllm_rank(plan.max_rank),
        max_cpu_loras=max(1, plan.adapter_slots),  # vLLM's cache of loaded adapters
        kv_cache_gib=kv_cache_gib(plan.kv_cache_mb),
        device="cpu" if plan.device.startswith("cpu") else "cuda",
        tensor_parallel_size=opts.tensor_parallel_size,
        extra_args=list(opts.extra_args),
    )


def start_engine(
    plan: ServePlan, store: Store, opts: VLLMOptions, preload: list[str], alias_refresh_s: float
) -> Any:
    """Start vLLM on the plan's base (the store's local copy, verified) and return the
    ``VLLMEngine`` in front of it, ready for traffic."""
    from transformers import AutoTokenizer

    from loom.models.loading import plan_load
    from loom.vllm.engine import VLLMEngine
    from loom.vllm.launch import check_python
    from loom.vllm.supervisor import Supervisor

    if plan.variant in CPU_VARIANTS:
        raise LoomError(
            f"--backend vllm serves float weights; {plan.variant} is Loom's own CPU variant: use "
            "--backend loom for it, or --dtype float32|bfloat16 with vLLM"
        )
    python = check_python(opts.python)  # before any loading: a missing venv is the user's fix
    loaded = plan_load(plan.base_ref, store=store, strict=True)
    base_dir = Path(loaded.base_path)
    launch = launch_for(plan, base_dir, opts, python)
    log_path = opts.log_path or Path(tempfile.gettempdir()) / f"loom-vllm-{launch.port}.log"
    supervisor = Supervisor(launch, log_path, opts.start_timeout_s)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    base = loaded.base
    fingerprint = base.manifest.base.fingerprint if base is not None and base.manifest.base else None
    config = plan.engine_config()
    config.alias_refresh_s = alias_refresh_s
    vocab = json.loads((base_dir / "config.json").read_text()).get("vocab_size")
    engine = VLLMEngine(
        supervisor,
        tokenizer,
        config,
        store=store,
        base_ref=loaded.base_ref,
        base_fingerprint=fingerprint,
        vocab_size=vocab,
    )
    engine.start(preload)
    return engine
