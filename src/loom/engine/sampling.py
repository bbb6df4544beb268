"""Next-token choice for a whole batch: logits processors, repetition penalty, temperature,
top-k, top-p, seeded sampling, each row isolated from the others.

The sampler takes the step's logits ``[rows, vocab]`` and one :class:`RowSampling` per row
(plain data) and returns one token or one error per row. A row whose processor raises, whose
logits are NaN or whose every token is masked gets an error and no token; the other rows of
the batch are sampled as if it were not there. Greedy rows take one batched argmax and sampled
rows one batched softmax; the only host sync is the final ``tolist`` (no ``.item()`` per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.engine.types import LogitsProcessor, SamplingParams

# Temperatures below this sample greedily, as vLLM does: dividing logits by 1e-300 overflows
# to inf and the probabilities to NaN, and the limit of sampling as T -> 0 is the argmax anyway.
SAMPLING_EPS = 1e-5


@dataclass
class RowSampling:
    """What the sampler needs of one row."""

    params: SamplingParams
    seen: list[int]  # prompt + generated ids, for the repetition penalty
    processor: LogitsProcessor | None = None
    generated: list[int] | None = None  # what the processor is shown
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.params.temperature < SAMPLING_EPS

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply first: the row's argmax is its token."""
        return self.greedy and self.processor is None and self.params.repetition_penalty == 1.0


@dataclass
class SampleResult:
    tokens: list[int | None]  # None where the row failed
    errors: dict[int, str]  # row -> why it failed


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty, as transformers applies it (divide positive, multiply negative)."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    scores = logits.index_select(0, idx)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.index_copy(0, idx, scores)


def sample_batch(logits: torch.Tensor, rows: list[RowSampling]) -> SampleResult:
    """One token per row of ``logits`` [rows, vocab] (float32 or wider)."""
    errors: dict[int, str] = {}
    if all(r.plain_greedy for r in rows):  # the common case: no copy, three small ops, one sync
        best, chosen = logits.max(dim=-1)
        # max propagates NaN: a row holding a NaN anywhere has a NaN maximum, so this looks at
        # one value per row instead of scanning the whole [rows, vocab] block a second time
        picked = torch.stack([chosen, torch.isnan(best).long()]).tolist()
        fast: list[int | None] = list(picked[0])
        for i, nan in enumerate(picked[1]):
            if nan:
                errors[i], fast[i] = "sampling failed: the logits are NaN", None
        return SampleResult(fast, errors)
    work = logits.clone()
    for i, row in enumerate(rows):
        if row.plain_greedy:
            continue
        try:
            work[i] = _prepare_row(work[i], row)
        except Exception as exc:  # the row's own processor or penalty: that request alone fails
            errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
            work[i] = 0.0
    best, chosen = work.max(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy and i not in errors]
    # A row with NaN (its maximum is NaN), or with every token masked (its maximum is -inf),
    # has no defined next token; nor has a sampled row whose probabilities come out NaN (a
    # +inf logit).
    unusable = torch.isnan(best) | (best == float("-inf"))
    if sampled:
        chosen[sampled], broken = _sample_rows(work[sampled], [rows[i] for i in sampled])
        unusable[sampled] |= broken
    tokens: list[int | None] = list(chosen.tolist())
    for i, bad in enumerate(unusable.tolist()):
        if bad and i not in errors:
            errors[i] = "sampling failed: the logits are NaN or every token is masked"
    for i in errors:
        tokens[i] = None
    return SampleResult(tokens, errors)


def _prepare_row(logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
    if row.processor is not None:
        logits = row.processor(row.generated or [], logits)
    return apply_repetition_penalty(logits, row.seen, row.params.repetition_penalty)


def _sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p and a draw for rows that sample, batched; seeded rows draw
    from their own generator (on the CPU, so a seed gives the same text on any device)."""
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    logits = logits / temps[:, None]
    limited = [i for i, r in enumerate(rows) if 0 < r.params.top_k < logits.shape[-1]]
    if limited:
        ks = torch.tensor([rows[i].params.top_k for i in limited], device=logits.device)
        values = torch.topk(logits[limited], int(ks.max())).values
        kth = values.gather(1, (ks - 1)[:, None])
        logits[limited] = logits[limited].masked_fill(logits[limited] < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=probs.dtype, device=probs.device)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest set reaching top_p; rows at 1.0 keep everything (a float32 cumulative
        # sum can pass 1.0 by an ulp and would cut their tail)
        drop = (cumulative - sorted_probs > top_p[:, None]) & (top_p < 1.0)[:, None]
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    # NaN rows are reported by the caller; a uniform stand-in keeps multinomial from raising
    # for the whole batch.
    broken = torch.isnan(probs).any(dim=-1) | ~(probs.sum(dim=-1) > 0)
    probs = torch.where(broken[:, None], torch.ones_like(probs), probs)
    out = torch.empty(len(rows), dtype=torch.long, device=probs.device)
    free = [i for i, r in enumerate(rows) if r.generator is None]
    if free:
        out[free] = torch.multinomial(probs[free], 1).flatten()
    for i, r in enumerate(rows):
        if r.generator is not None:
            draw = torch.multinomial(probs[i].to(r.generator.device), 1, generator=r.generator)
            out[i] = draw.to(out.device)[0]
    return out, broken
