"""Rough memory and time estimates for ``--dry-run`` (from metadata only, no weights)."""

from __future__ import annotations

from dataclasses import dataclass

from loom.store.manifest import ArchitectureFacts

MIB = 2**20
# Sustained training throughput assumed for the time estimate; measured on the
# project's 2-core CPU machines (fp32) and typical of one modern GPU (bf16).
ASSUMED_FLOPS = {"cpu": 1.0e11, "cuda": 1.0e14}


@dataclass
class Estimate:
    weights_mb: int
    lora_params: int
    optimizer_mb: int
    activations_mb: int
    total_mb: int
    flops: float
    time_s: float
    assumption: str


def lora_params(arch: ArchitectureFacts, targets: list[str], r: int) -> int:
    h, layers = arch.hidden_size, arch.num_hidden_layers
    head = h // arch.num_attention_heads
    kv = arch.num_key_value_heads * head
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, arch.intermediate_size),
        "up_proj": (h, arch.intermediate_size),
        "down_proj": (arch.intermediate_size, h),
    }
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


def estimate(
    arch: ArchitectureFacts,
    params: int,
    weights_mb: int,
    targets: list[str],
    r: int,
    batch: int,
    seq_len: int,
    train_tokens: int,
    device: str,
    gradient_checkpointing: bool = False,
) -> Estimate:
    n_lora = lora_params(arch, targets, r)
    optimizer_mb = int(n_lora * 16 / MIB)  # fp32 weight + grad + two AdamW moments
    # ~34 bytes per hidden unit per token per layer in fp32 without checkpointing
    # (attention + MLP intermediates kept for backward), a standard rule of thumb.
    per_layer = 34 * batch * seq_len * arch.hidden_size
    layers = 1 if gradient_checkpointing else arch.num_hidden_layers
    logits = batch * seq_len * arch.vocab_size * 4 * 2
    activations_mb = int((per_layer * layers + logits) / MIB)
    flops = 6.0 * params * train_tokens  # forward + backward through the frozen base
    rate = ASSUMED_FLOPS["cuda" if device.startswith("cuda") else "cpu"]
    return Estimate(
        weights_mb=weights_mb,
        lora_params=n_lora,
        optimizer_mb=optimizer_mb,
        activations_mb=activations_mb,
        total_mb=weights_mb + optimizer_mb + activations_mb,
        flops=flops,
        time_s=flops / rate,
        assumption=f"{rate:.0e} FLOP/s sustained on {device}",
    )
