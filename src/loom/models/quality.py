"""The quality guard of quantized variants: measure a variant against fp32, and refuse to
serve one whose recorded error is over the bounds.

Both models run through the engine's own runner (``ModelRunner``: the served code path,
bf16 activations into the quantized kernels included). fp32 decodes greedily from each of
``GUARD_PROMPTS``; the variant is then fed the same tokens, so each position compares the
two next-token distributions after the same prefix: per-token KL(fp32 || variant) and
whether the variant's top token is fp32's (greedy agreement).
"""

from __future__ import annotations

from typing import Any

import torch

from loom.errors import LoomError
from loom.store.variants import VariantManifest, VariantQuality

# Bounds (nats per token; share of tokens), fixed and stated. KL is the steady measure: int8 of
# the default base measures 0.005 (10x inside), int4 0.28 (over). Top-1 agreement on these
# open-ended prompts is lower than on task prompts, because a 135M model has many near-ties
# there: int8 agrees on 93.75% of them (and on 99.5% of SNIPS tokens), int4 on 75%; 90%
# separates the two with room on both sides.
MAX_MEAN_KL = 0.05
MIN_AGREEMENT = 0.90
GUARD_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Translate to German: Good morning, how are you?",
    "Here is a short story about a robot who learns to paint.",
    "Q: What is 17 times 23?\nA:",
    "Book a table for two at an Italian restaurant tomorrow at 7 pm.",
    "The three primary colors are",
    "Summarize: The meeting was moved from Monday to Wednesday because the manager was ill.",
)
GUARD_NEW_TOKENS = 24


def prompt_ids(tokenizer: Any, prompts: tuple[str, ...] = GUARD_PROMPTS) -> list[list[int]]:
    return [list(tokenizer(p, add_special_tokens=False)["input_ids"]) or [0] for p in prompts]


def _runner(model: Any) -> Any:
    from loom.engine.runner import ModelRunner

    return ModelRunner(model, num_slots=1, max_rank=1, targets=())


def greedy_logprobs(model: Any, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """fp32's greedy continuation of every prompt and its log-probabilities [steps, P, V]."""
    return _run(model, prompts, steps, forced=None)


def forced_logprobs(model: Any, prompts: list[list[int]], tokens: list[list[int]]) -> torch.Tensor:
    """The log-probabilities [steps, P, V] of ``model`` fed ``tokens`` after each prompt."""
    return _run(model, prompts, len(tokens[0]), forced=tokens)[1]


def _run(
    model: Any, prompts: list[list[int]], steps: int, forced: list[list[int]] | None
) -> tuple[list[list[int]], torch.Tensor]:
    runner = _runner(model)
    longest = max(len(p) for p in prompts) + steps + 1
    cache = runner.new_cache(1 << 40, longest, max_seqs=len(prompts))
    none = [-1] * len(prompts)
    logits = runner.prefill(cache, 0, prompts, none)
    out, chosen = [], [[] for _ in prompts]  # type: ignore[var-annotated]
    for step in range(steps):
        out.append(torch.log_softmax(logits.float(), dim=-1))
        picks = [forced[i][step] for i in range(len(prompts))] if forced else logits.argmax(-1).tolist()
        for row, tok in zip(chosen, picks, strict=True):
            row.append(int(tok))
        if step + 1 < steps:
            positions = [len(p) + step for p in prompts]
            logits = runner.decode(cache, [int(t) for t in picks], positions, none)
    return chosen, torch.stack(out)


def compare(ref: torch.Tensor, test: torch.Tensor, tokens: list[list[int]]) -> VariantQuality:
    """KL(ref || test) per position and top-1 agreement with ``tokens`` (ref's greedy picks)."""
    kl = (ref.exp() * (ref - test)).sum(-1).clamp(min=0)  # [steps, P]
    picked = torch.tensor(tokens).t()  # [steps, P]
    agree = (test.argmax(-1) == picked).float()
    return VariantQuality(
        prompts=int(ref.shape[1]),
        tokens=int(kl.numel()),
        mean_kl=round(float(kl.mean()), 6),
        max_kl=round(float(kl.max()), 6),
        agreement=round(float(agree.mean()), 6),
    )


def quality_problem(manifest: VariantManifest) -> str | None:
    """Why the variant is over the guard's bounds (None: within them)."""
    q = manifest.quality
    where = f"variant {manifest.variant} of {manifest.base}"
    if q is None:
        return f"{where} has no quality record (made with the check skipped)"
    if q.mean_kl > MAX_MEAN_KL or q.agreement < MIN_AGREEMENT:
        return (
            f"{where} differs from fp32 beyond the quality bound: mean KL {q.mean_kl:.4f} "
            f"(bound <= {MAX_MEAN_KL}), greedy agreement {q.agreement:.1%} (bound >= "
            f"{MIN_AGREEMENT:.0%}) over {q.tokens} tokens"
        )
    return None


def check_quality(manifest: VariantManifest, allow_lossy: bool) -> str | None:
    """Raise when the variant is over the bounds and ``allow_lossy`` is off; else the note to
    show (None when within the bounds)."""
    problem = quality_problem(manifest)
    if problem is None:
        return None
    if not allow_lossy:
        other = " or the int8 variant (--dtype int8)" if manifest.variant == "int4" else ""
        raise LoomError(
            f"{problem}; serve it anyway with --allow-lossy, or serve fp32 (--dtype float32){other}"
        )
    return f"{problem}; served anyway (--allow-lossy)"
