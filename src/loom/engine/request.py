"""Per-request state the scheduler keeps, and the sinks that carry output to callers."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loom.engine.detok import IncrementalDecoder
from loom.engine.types import Completion, FinishReason, LogitsProcessor, SamplingParams, StreamChunk


class Sink:
    """Where a request's chunks go: an asyncio queue (from the engine thread, safely) or a plain queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.aqueue: asyncio.Queue[StreamChunk] | None = asyncio.Queue() if loop else None
        self.squeue: queue.Queue[StreamChunk] = queue.Queue()

    def put(self, chunk: StreamChunk) -> None:
        if self.loop is not None and self.aqueue is not None:
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.aqueue.put_nowait, chunk)
        else:
            self.squeue.put(chunk)


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_ref: str | None  # as asked
    adapter_key: str | None  # concrete name@version once resolved
    sink: Sink
    decoder: IncrementalDecoder
    processor: LogitsProcessor | None = None
    arrived: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    slot: int = -1  # adapter slot (-1 base)
    ready: bool = False  # adapter resident (or none needed)
    error: str | None = None
    cancelled: bool = False
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    emitted_chars: int = 0
    generator: torch.Generator | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> int:
        """Cache position of the next token to feed (prompt + generated so far, minus the pending one)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def budget_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens

    def completion(self, reason: FinishReason, text: str) -> Completion:
        now = time.monotonic()
        return Completion(
            request_id=self.id,
            text=text,
            token_ids=list(self.generated),
            prompt_tokens=len(self.prompt_ids),
            finish_reason=reason,
            adapter=self.adapter_key,
            error=self.error,
            error_kind=self.meta.get("error_kind"),
            time_to_first_token_s=(self.first_token_at - self.arrived) if self.first_token_at else None,
            total_s=now - self.arrived,
            token_times=self.token_times,
        )
