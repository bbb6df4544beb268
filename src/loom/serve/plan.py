"""The orchestration policy: from manifests and the device's memory, decide how to serve.

Everything here reads metadata only (manifests, the device's free memory), so
``loom serve --dry-run`` can print the plan without loading any weights, and a
configuration that over-commits memory is refused before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loom.engine.engine import EngineConfig
from loom.engine.linear import can_pack, packs
from loom.engine.runner import ATTN_TARGETS
from loom.errors import LoomError
from loom.models.device import DTYPES, pick_device, pick_dtype
from loom.serve.config import ServeConfig
from loom.serve.lora_limits import StoredAdapter, choose_lora, stored_adapter, stored_adapters
from loom.store.facts import RUNTIME_OVERHEAD
from loom.store.manifest import ArchitectureFacts, BaseInfo
from loom.store.store import Resolved, Store
from loom.store.variants import CPU_VARIANTS, offered_variants, variant_weight_bytes

MIB = 2**20
# The process itself before any model: Python, torch, transformers and the server imported
# (measured 362 MB RSS on the project's CPU machine), or the CUDA context on a GPU.
RUNTIME_MB = {"cpu": 400, "cuda": 600}
# Prompt tokens per prefill step (longer prompts are chunked). benchmarks/chunked_prefill.py
# on the 2-core CPU, a 1,500-token prompt arriving while 8 streams decode the default base:
# their longest wait 4.8 s unchunked, 1.7 s with 512-token chunks, 0.9 s with 256, the
# long prompt's first token no later. A GPU prefills thousands of tokens in milliseconds.
PREFILL_TOKENS = {"cpu": 256, "cuda": EngineConfig().max_prefill_tokens_per_step}
DEFAULT_PREFIX_MB = EngineConfig().prefix_cache_mb
VARIANT_OF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
QUANTIZED_ORDER = ("nf4_bnb", "int8_bnb")


class OverBudgetError(LoomError):
    """The plan needs more memory than the budget (the message says by how much and what to lower)."""


@dataclass
class ServePlan:
    base_ref: str
    device: str
    variant: str
    dtype: str
    budget_mb: int
    weights_mb: int
    adapter_slots: int
    adapter_slot_mb: float
    kv_cache_mb: int
    prefix_cache_mb: int
    kv_sequences: int
    max_batch_size: int
    max_seq_len: int
    max_rank: int
    activations_mb: int
    runtime_mb: int
    lora_targets: list[str] = field(default_factory=lambda: list(ATTN_TARGETS))
    lora_reason: str = "given"  # why these targets and this rank (shown by --dry-run)
    dtype_reason: str = "given"  # why this dtype (--dtype auto on CPUs: loom.models.dtype_probe)
    max_prefill_tokens: int = EngineConfig().max_prefill_tokens_per_step
    pack_weights: bool = True
    preload: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_mb(self) -> int:
        adapters = round(self.adapter_slots * self.adapter_slot_mb)
        kv = self.kv_cache_mb + self.prefix_cache_mb
        return self.weights_mb + adapters + kv + self.activations_mb + self.runtime_mb

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            kv_cache_mb=self.kv_cache_mb,
            prefix_cache_mb=self.prefix_cache_mb,
            max_prefill_tokens_per_step=self.max_prefill_tokens,
            max_adapters=self.adapter_slots,
            max_rank=self.max_rank,
            lora_targets=tuple(self.lora_targets),
            # the byte cap must not refuse what the slots were sized for
            adapter_cache_mb=max(512, int(self.adapter_slots * self.adapter_slot_mb) + 1),
            pack_weights=self.pack_weights,
        )

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "total_mb": self.total_mb}


def device_memory_mb(device: torch.device) -> int:
    """Memory free for this process on ``device`` right now."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free // MIB)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // MIB)


def _packs_head(dtype: torch.dtype) -> bool:
    """Whether the engine holds the lm_head oneDNN-packed in ``dtype`` on this CPU."""
    return packs("vocab", dtype) and can_pack(torch.empty(0, 0, dtype=dtype))


def _lora_dims(arch: ArchitectureFacts, targets: Sequence[str]) -> int:
    """Sum over the served LoRA targets of (in + out) features, per layer."""
    head_dim = arch.hidden_size // arch.num_attention_heads
    kv = arch.num_key_value_heads * head_dim
    hidden, mlp = arch.hidden_size, arch.hidden_size + arch.intermediate_size
    sizes = {"q_proj": 2 * hidden, "k_proj": hidden + kv, "v_proj": hidden + kv, "o_proj": 2 * hidden}
    sizes |= {"gate_proj": mlp, "up_proj": mlp, "down_proj": mlp}
    return sum(sizes[t] for t in targets)


def cpu_variant(info: BaseInfo, cfg: ServeConfig, device: torch.device) -> str | None:
    """Loom's own quantized CPU variant (int8/int4, ``loom.models.quantize``) when asked for:
    ``--dtype int8|int4``; with ``--dtype auto``, the agent map's ``variant_preference`` when
    the first entry this device serves is one; ``--quantize`` on a CPU: the preference's
    first quantized variant, else int8."""
    wanted = cfg.dtype if cfg.dtype in CPU_VARIANTS else None
    if wanted is None:  # from the map or --quantize: the first this base offers, never an error
        if cfg.dtype != "auto" or device.type != "cpu":
            return None
        offered = offered_variants(info)
        served = ("fp32", "bf16", *offered)
        first = next((v for v in cfg.variant_preference if v in served), None)
        if first in offered:
            return first
        if cfg.allow_quantized:  # the operator's flag wins over the map's float entries
            return next((v for v in (*cfg.variant_preference, "int8", "int4") if v in offered), None)
        return None
    if device.type != "cpu":
        raise LoomError(
            f"--dtype {wanted} runs on CPUs (torch's packed-weight CPU kernels); on {device} use "
            "--device cpu, or --quantize for the bitsandbytes variants on CUDA"
        )
    if wanted not in offered_variants(info):
        raise LoomError(
            f"this base offers {offered_variants(info) or 'no'} quantized CPU variants, not {wanted}: "
            "pick another --dtype"
        )
    return wanted


def choose_variant(info: BaseInfo, cfg: ServeConfig, device: torch.device) -> tuple[str, torch.dtype, str]:
    """Quantized when asked and available (int8/int4 on CPU: ``cpu_variant``; nf4/int8 on CUDA
    with bitsandbytes), else the best float dtype; with the reason (``ServePlan.dtype_reason``)."""
    quantized = cpu_variant(info, cfg, device)
    if quantized is not None:  # activations, KV cache and LoRA stay fp32
        how = (
            f"--dtype {cfg.dtype}"
            if cfg.dtype == quantized
            else "the agent map's variant_preference or --quantize"
        )
        return quantized, torch.float32, f"{quantized} weights ({how})"
    if cfg.allow_quantized and device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            for variant in QUANTIZED_ORDER:
                if variant in info.quantized_variants:
                    return variant, torch.bfloat16, "quantized weights (--quantize, CUDA, bitsandbytes)"
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise LoomError(f"--dtype {cfg.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if cfg.dtype != "auto":
        dtype = pick_dtype(cfg.dtype, device)
        return VARIANT_OF_DTYPE[dtype], dtype, f"given: --dtype {cfg.dtype}"
    preferred = preferred_dtype(cfg, device)
    if preferred is not None:
        skipped = [v for v in cfg.variant_preference if v not in FLOAT_VARIANTS and v not in CPU_VARIANTS]
        reason = f"the first of the agent map's variant_preference {cfg.variant_preference} the device serves"
        if skipped:
            reason += f" ({', '.join(skipped)}: not served on this device)"
        return VARIANT_OF_DTYPE[preferred], preferred, reason
    if device.type == "cpu":  # fp32 or bf16, whichever this CPU runs the base's products faster
        from loom.models.dtype_probe import choose_cpu_dtype

        choice = choose_cpu_dtype(info.arch)
        return VARIANT_OF_DTYPE[choice.dtype], choice.dtype, choice.reason
    dtype = pick_dtype("auto", device)
    return VARIANT_OF_DTYPE[dtype], dtype, f"{NAMES_OF_DTYPE[dtype]}: the GPU's fastest float dtype"


# the agent map's variant names -> the float dtypes the engine serves them in
FLOAT_VARIANTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES_OF_DTYPE = {dtype: name for name, dtype in FLOAT_VARIANTS.items()}


def preferred_dtype(cfg: ServeConfig, device: torch.device) -> torch.dtype | None:
    """The first of the agents' ``variant_preference`` this device serves (fp16 on CUDA only;
    int8/int4/nf4 are skipped: the engine serves float weights only for now)."""
    for variant in cfg.variant_preference:
        dtype = FLOAT_VARIANTS.get(variant)
        if dtype is not None and (dtype != torch.float16 or device.type == "cuda"):
            return dtype
    return None


def make_plan(
    cfg: ServeConfig,
    arch: ArchitectureFacts,
    info: BaseInfo | None,
    base_ref: str,
    adapters: Sequence[StoredAdapter] = (),
) -> ServePlan:
    """The plan for ``arch``; ``adapters``: the stored adapters for this base (LoRA defaults)."""
    device = pick_device(cfg.device)
    if info is not None:
        variant, dtype, dtype_reason = choose_variant(info, cfg, device)
        # fp16 weighs what bf16 does; the manifest lists bf16 only.
        key = {"float16": "bfloat16"}.get(variant, variant)
        weights_mb = info.variant_vram_mb.get(key, info.approx_vram_mb)
        if variant in CPU_VARIANTS:
            weights_mb = math.ceil(variant_weight_bytes(info, variant) * RUNTIME_OVERHEAD / MIB)
    else:  # stub mode: no manifest, the model is tiny
        dtype = pick_dtype(cfg.dtype, device)
        variant, weights_mb = VARIANT_OF_DTYPE[dtype], 1
        dtype_reason = "stub mode (tiny test model)" if cfg.dtype == "auto" else f"given: --dtype {cfg.dtype}"
    nbytes = torch.empty((), dtype=dtype).element_size()
    packed_head_mb = 0
    if device.type == "cpu" and cfg.pack_weights and variant not in CPU_VARIANTS and _packs_head(dtype):
        # The engine holds CPU weights oneDNN-packed (loom.engine.linear: fp32, and bf16 on
        # CPUs with native bf16). Packing replaces the projections' weights, except an
        # lm_head tied to the input embeddings, which stay dense: that is a second copy. The
        # manifest does not record tying, so the copy is counted either way (small next to
        # an untied base).
        packed_head_mb = math.ceil(arch.vocab_size * arch.hidden_size * nbytes / MIB)
        weights_mb += packed_head_mb
    budget = cfg.memory_mb or int(device_memory_mb(device) * cfg.memory_fraction)
    lora = choose_lora(cfg, adapters)
    max_rank = lora.rank
    # +1: the engine keeps an all-zero slot that base-only rows point at
    dims = _lora_dims(arch, lora.targets)
    slot_mb = arch.num_hidden_layers * dims * max_rank * nbytes / MIB * (1 + 1 / cfg.max_adapters)
    head_dim = arch.hidden_size // arch.num_attention_heads
    per_seq_mb = (
        2 * arch.num_hidden_layers * arch.num_key_value_heads * head_dim * nbytes * cfg.max_seq_len / MIB
    )
    # Peak activations: one batched prefill, whose tokens the scheduler keeps within
    # max_prefill_tokens_per_step (a longer prompt goes in chunks of it), through one layer
    # (hidden, q/k/v/o and the MLP's gate/up at once), attention scores (tokens x heads x
    # span, fp32 at worst; an upper bound, as rows are attended one at a time) and fp32
    # logits for the whole batch.
    chunk = cfg.max_prefill_tokens
    if chunk is None:
        chunk = PREFILL_TOKENS.get(device.type, PREFILL_TOKENS["cuda"])
    if chunk < 1:
        raise LoomError(f"--max-prefill-tokens {chunk}: give a positive number of tokens")
    prefill_tokens = min(chunk, cfg.max_batch_size * cfg.max_seq_len)
    act_bytes = prefill_tokens * (6 * arch.hidden_size + 3 * arch.intermediate_size) * nbytes
    act_bytes += prefill_tokens * arch.num_attention_heads * cfg.max_seq_len * 4
    act_bytes += cfg.max_batch_size * arch.vocab_size * 4 * 2
    activations_mb = int(act_bytes / MIB) + 64  # + allocator slack
    runtime_mb = RUNTIME_MB.get(device.type, RUNTIME_MB["cpu"])
    if cfg.prefix_cache_mb is not None and cfg.prefix_cache_mb < 0:
        raise LoomError(f"--prefix-cache-mb {cfg.prefix_cache_mb}: give 0 (off) or a size in MiB")
    fixed = (
        weights_mb
        + round(cfg.max_adapters * slot_mb)
        + (cfg.prefix_cache_mb or 0)
        + activations_mb
        + runtime_mb
    )
    notes: list[str] = lora.notes()
    if packed_head_mb:
        name = str(dtype).removeprefix("torch.")
        notes.append(f"weights include {packed_head_mb} MiB for a oneDNN-packed lm_head copy (CPU {name})")
    if cfg.kv_cache_mb is not None:
        kv_mb = cfg.kv_cache_mb
    else:  # enough for a full batch of full-length sequences, or what is left
        kv_mb = min(int(cfg.max_batch_size * per_seq_mb) + 1, max(budget - fixed, 0))
    prefix_mb = cfg.prefix_cache_mb
    if prefix_mb is None:  # what the budget has left after the KV cache, up to DEFAULT_PREFIX_MB
        prefix_mb = min(DEFAULT_PREFIX_MB, max(budget - fixed - kv_mb, 0))
    kv_sequences = int(kv_mb // per_seq_mb) if per_seq_mb else cfg.max_batch_size
    batch = min(cfg.max_batch_size, kv_sequences)
    if 0 < batch < cfg.max_batch_size:
        notes.append(
            f"the KV cache holds {kv_sequences} sequences of {cfg.max_seq_len} tokens: batch limit "
            f"lowered from {cfg.max_batch_size} to {batch}"
        )
    plan = ServePlan(
        base_ref=base_ref,
        device=str(device),
        variant=variant,
        dtype=str(dtype).removeprefix("torch."),
        budget_mb=budget,
        weights_mb=weights_mb,
        adapter_slots=cfg.max_adapters,
        adapter_slot_mb=round(slot_mb, 2),
        kv_cache_mb=kv_mb,
        prefix_cache_mb=prefix_mb,
        kv_sequences=kv_sequences,
        max_batch_size=batch,
        max_seq_len=cfg.max_seq_len,
        max_rank=max_rank,
        activations_mb=activations_mb,
        runtime_mb=runtime_mb,
        lora_targets=list(lora.targets),
        lora_reason=lora.reason,
        dtype_reason=dtype_reason,
        max_prefill_tokens=chunk,
        pack_weights=cfg.pack_weights,
        preload=list(cfg.preload),
        notes=notes,
    )
    if batch < 1 or plan.total_mb > budget:
        over = plan.total_mb - budget if plan.total_mb > budget else int(per_seq_mb)
        raise OverBudgetError(
            f"serving {base_ref} as {variant} on {device} needs {plan.total_mb} MiB (weights {weights_mb}, "
            f"adapters {round(cfg.max_adapters * slot_mb)}, KV cache {kv_mb}, prefix cache "
            f"{prefix_mb}, activations {activations_mb}, "
            f"runtime {runtime_mb}) "
            f"but the budget is {budget} MiB: over by {over} MiB. Lower --max-batch-size, --max-seq-len, "
            f"--max-adapters, --max-lora-rank (now {max_rank}), --lora-targets (now "
            f"{','.join(lora.targets)}), --kv-cache-mb or --prefix-cache-mb, serve a quantized variant "
            f"(--dtype int8 or int4 on CPU, --quantize on CUDA), or raise --memory-mb"
        )
    if variant in QUANTIZED_ORDER:
        notes.append(f"{variant}: quantized weights chosen (--quantize, CUDA, bitsandbytes installed)")
    if variant in CPU_VARIANTS:
        notes.append(f"{variant}: weight-only quantized projections on torch's CPU kernels; LoRA in fp32")
    if cfg.dtype == "auto" and variant not in QUANTIZED_ORDER:
        notes.append(f"dtype: {dtype_reason}")
    return plan


def plan_from_store(cfg: ServeConfig, store: Store, preload: list[str]) -> ServePlan:
    """The plan for ``cfg.base`` (or the default base) and ``preload``, from manifests alone."""
    from loom.models.loading import resolve_adapter

    base_name = cfg.base or store.default_base()
    if base_name is None:
        raise LoomError(
            "no base model given and the store has no default; pass --base NAME or run "
            "'loom store import-base --default'"
        )
    resolved = store.resolve(base_name)
    info = resolved.manifest.base
    if info is None:
        raise LoomError(f"{base_name} is a {resolved.manifest.kind}, not a base model; pass a base to --base")
    adapters = stored_adapters(store, info.fingerprint)
    for ref in preload:  # each must resolve, to an adapter for this base
        found = resolve_adapter(store, ref, info.fingerprint, resolved.ref)
        assert found.manifest.adapter is not None  # resolve_adapter refuses anything else
        adapters.append(stored_adapter(found.ref, found.manifest.adapter, preload=True))
    try:
        plan = make_plan(cfg, info.arch, info, resolved.ref, adapters)
    except OverBudgetError as exc:
        plan = quantized_fallback(cfg, info, resolved.ref, adapters, exc)
    plan.preload = list(preload)
    if plan.variant in CPU_VARIANTS:
        plan.notes.append(variant_note(store, resolved, plan.variant, cfg.allow_lossy, plan.budget_mb))
    return plan


def quantized_fallback(
    cfg: ServeConfig, info: BaseInfo, ref: str, adapters: Sequence[StoredAdapter], over: OverBudgetError
) -> ServePlan:
    """With ``--dtype auto`` on a CPU, a float plan over the budget falls back to the first of
    int8, int4 that fits (the quality guard still applies); otherwise ``over`` is raised."""
    if cfg.dtype != "auto" or pick_device(cfg.device).type != "cpu":
        raise over
    for variant in offered_variants(info):
        try:
            plan = make_plan(dataclasses.replace(cfg, dtype=variant), info.arch, info, ref, adapters)
        except OverBudgetError:
            continue
        plan.notes.append(f"{variant} chosen because the float weights do not fit: {over}")
        return plan
    raise over


def making_problem(base: Resolved, variant: str, budget_mb: int) -> str | None:
    """Making a variant on first load checks it against the fp32 base, which must fit beside the
    variant: a plan that fell back to int8 because the float weights do not fit cannot make it."""
    info = base.manifest.base
    if info is None:
        return None
    fp32_mb = info.variant_vram_mb.get("float32", info.approx_vram_mb * 2)
    need = fp32_mb + math.ceil(variant_weight_bytes(info, variant) / MIB)
    if need <= budget_mb:
        return None
    return (
        f"the {variant} variant of {base.ref} is not made yet, and making it here (checked against "
        f"the fp32 base) needs about {need} MiB, over this server's {budget_mb} MiB: make it once "
        f"with 'loom store quantize {base.ref} --variant {variant}' on a machine with the memory "
        "(or with --no-check, then serve it with --allow-lossy)"
    )


def variant_note(store: Store, base: Resolved, variant: str, allow_lossy: bool, budget_mb: int) -> str:
    """The cached variant's recorded quality (refused over the guard's bounds unless
    ``allow_lossy``: from metadata, so a dry run refuses too), or that it is made on first load."""
    from loom.models.quality import check_quality
    from loom.store.variants import read_variant

    manifest = read_variant(store, base, variant)
    if manifest is None:
        problem = making_problem(base, variant, budget_mb)
        if problem is not None:  # the dry run shows it; the start refuses (loom.serve.app)
            return f"cannot start yet: {problem}"
        return (
            f"{variant}: not cached yet; made (and checked against fp32) on first load, or now with "
            f"'loom store quantize {base.ref} --variant {variant}'"
        )
    lossy = check_quality(manifest, allow_lossy)
    q = manifest.quality
    if lossy or q is None:  # over the bounds (or unchecked) and --allow-lossy
        return lossy or ""
    return (
        f"{variant}: cached; against fp32 mean KL {q.mean_kl:.4f}, greedy agreement {q.agreement:.1%} "
        f"over {q.tokens} tokens"
    )
