"""Plain request/response types passed between the engine, scheduler and callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch


class LogitsProcessor(Protocol):
    """Per-request hook over next-token logits (constrained decoding plugs in here)."""

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...

    def is_terminated(self) -> bool: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Refuse what no model run can honour; the message names the field and the range."""
        import math

        from loom.errors import LoomError

        if self.max_new_tokens < 1:
            raise LoomError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            # below SAMPLING_EPS a temperature samples greedily (loom.engine.sampling)
            raise LoomError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise LoomError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LoomError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_PENALTY):
            raise LoomError(
                f"repetition_penalty must be in (0, {MAX_PENALTY:g}], got {self.repetition_penalty} "
                "(1.0 is off; 1.1-1.3 is the usual range)"
            )


# Past this a penalty only flips signs of already-seen logits by huge factors; a bound keeps
# every row's logits finite whatever a client sends.
MAX_PENALTY = 100.0


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class Completion:
    """What a finished request returns."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    adapter: str | None  # resolved ref (name@version) actually used, or None for base
    error: str | None = None
    # "adapter": the asked adapter cannot be served (the caller's choice); "adapter_store": its
    # stored files could not be read or failed their checksums (the server's problem)
    error_kind: str | None = None
    time_to_first_token_s: float | None = None
    total_s: float = 0.0
    token_times: list[float] = field(default_factory=list, repr=False)


@dataclass
class StreamChunk:
    request_id: str
    text: str  # newly decoded text (never a broken multi-byte character)
    token_ids: list[int]
    finished: bool = False
    completion: Completion | None = None
    meta: dict[str, Any] = field(default_factory=dict)
