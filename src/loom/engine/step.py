"""What one model pass computes: the scheduler's plain-data output, as vLLM v1's
``SchedulerOutput`` is.

The engine's step is four parts with plain data between them: the scheduler decides what
runs (a :class:`PrefillPass` or a :class:`DecodePass`: rows, tokens, positions, and the
adapter slot each row reads, the step's LoRA mapping); the runner executes it and returns
logits; the sampler (``loom.engine.sampling``) picks a token or an error per row; the output
processor (``loom.engine.output``) turns tokens into text, stops and stream chunks. A pass
holds no request and no tensor (``tests/test_runner_ops.py`` builds them by hand), and a
failure in one part is that part's to report (a bad row ends alone in the sampler or the output processor; a
failed pass ends only its own rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefillPass:
    """Prompts computed together into KV rows ``first_row``, ``first_row + 1``, ...

    Row i computes ``prompts[i][starts[i]:]`` at positions ``starts[i]..``, after the
    ``starts[i]`` tokens already in its KV row (a reused prefix, or earlier chunks of a long
    prompt); the pass returns each prompt's last-token logits."""

    first_row: int
    prompts: list[list[int]]
    adapter_slots: list[int]  # per prompt: its adapter's slot, -1 for the base
    starts: list[int] = field(default_factory=list)  # empty: every prompt from its start


@dataclass(frozen=True)
class DecodePass:
    """One new token for each of KV rows ``0..len(token_ids)-1``."""

    token_ids: list[int]  # per row: the token to feed (the last one sampled)
    positions: list[int]  # per row: its position
    adapter_slots: list[int]  # per row: its adapter's slot, -1 for the base


ModelPass = PrefillPass | DecodePass
