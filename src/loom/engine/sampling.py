"""Next-token choice: repetition penalty, temperature, top-k, top-p, seeded sampling."""

from __future__ import annotations

import torch

from loom.engine.types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty, as transformers applies it (divide positive, multiply negative)."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    scores = logits.index_select(0, idx)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.index_copy(0, idx, scores)


def sample(
    logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator | None
) -> int:
    """Choose one token from a [vocab] logits row."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if generator is not None and probs.device != generator.device:
        # Seeded generators live on the CPU, so a seed gives the same text on any device.
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))
