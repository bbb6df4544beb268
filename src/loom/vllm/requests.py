"""One generation against vLLM's /v1/completions: Loom's plain request types in, Loom's
``StreamChunk``/``Completion`` out.

The gateway sends token ids (``prompt: [ids]``), tokenized by Loom with the base's own
tokenizer and chat template, so a prompt is the same tokens whichever backend answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from loom.engine.types import Completion, FinishReason, SamplingParams, StreamChunk


@dataclass(frozen=True)
class GuidedDecoding:
    """Constrained decoding as vLLM's ``structured_outputs`` (a spec, not a logits hook).

    It stands where Loom's engine takes a ``LogitsProcessor``, so routes and agents ask the
    backend for "JSON under this schema" the same way; vLLM compiles and applies it."""

    kind: str  # "json", "json_object" or "regex"
    spec: Any = None

    def structured_outputs(self) -> dict[str, Any]:
        return {"json_object": True} if self.kind == "json_object" else {self.kind: self.spec}

    # The LogitsProcessor protocol, for the type checker: vLLM applies the constraint itself.
    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise TypeError("GuidedDecoding is applied by vLLM, not called as a logits processor")

    def accept(self, token: int) -> None:
        raise TypeError("GuidedDecoding is applied by vLLM, not called as a logits processor")

    def is_terminated(self) -> bool:
        return False


def completion_body(
    model: str, ids: list[int], params: SamplingParams, guided: GuidedDecoding | None, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": ids,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "stop": params.stop or None,
        "stop_token_ids": params.stop_token_ids or None,
        "ignore_eos": params.ignore_eos,
        "return_token_ids": True,
        "stream": stream,
    }
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if guided is not None:
        body["structured_outputs"] = guided.structured_outputs()
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Tally:
    """A generation's output as it arrives, and its timings."""

    request_id: str
    prompt_tokens: int
    adapter: str | None
    started: float
    text: str = ""
    finish: str | None = None
    first_at: float | None = None

    def __post_init__(self) -> None:
        self.token_ids: list[int] = []
        self.token_times: list[float] = []
        self.error: str | None = None
        self.error_kind: str | None = None

    def add_event(self, event: dict[str, Any]) -> list[StreamChunk]:
        """One SSE event's chunks; an error event (vLLM fails a stream mid-way as
        ``data: {"error": ...}``) ends the tally with that error."""
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            code = int(error.get("code") or 500)
            self.error = f"vLLM failed the stream ({code}): {error.get('message')}"
            self.error_kind = "input" if 400 <= code < 500 else "engine"
            return []
        return [self.add(choice) for choice in event.get("choices") or []]

    def add(self, choice: dict[str, Any]) -> StreamChunk:
        now = time.monotonic()
        new_ids = [int(i) for i in choice.get("token_ids") or []]
        if new_ids and self.first_at is None:
            self.first_at = now
        self.token_ids += new_ids
        self.token_times += [now] * len(new_ids)
        piece = choice.get("text") or ""
        self.text += piece
        self.finish = choice.get("finish_reason") or self.finish
        return StreamChunk(self.request_id, piece, new_ids)

    def completion(self, error: str | None = None, error_kind: str | None = None) -> Completion:
        error, error_kind = error or self.error, error_kind or self.error_kind
        if error is None and self.finish is None:  # the stream ended without saying how
            error, error_kind = "vLLM ended the stream without a finish reason", "engine"
        reason: FinishReason = "error" if error else ("length" if self.finish == "length" else "stop")
        if self.finish == "abort" and not error:
            reason = "cancelled"
        return Completion(
            request_id=self.request_id,
            text=self.text,
            token_ids=self.token_ids,
            prompt_tokens=self.prompt_tokens,
            finish_reason=reason,
            adapter=self.adapter,
            error=error,
            error_kind=error_kind,
            time_to_first_token_s=self.first_at - self.started if self.first_at else None,
            total_s=time.monotonic() - self.started,
            token_times=self.token_times,
        )


def error_of(response: httpx.Response) -> tuple[str, str]:
    """vLLM's error answer -> (message, Loom error kind): its 4xx are the request's fault."""
    try:
        message = str(response.json()["error"]["message"])
    except Exception:
        message = response.text[:500]
    kind = "input" if 400 <= response.status_code < 500 else "engine"
    return f"vLLM answered {response.status_code}: {message}", kind


def sse_event(line: str) -> dict[str, Any] | None:
    """One ``data:`` line's JSON; a line that is not JSON is reported as an error event."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    try:
        event = json.loads(line.removeprefix("data: "))
    except json.JSONDecodeError:
        return {"error": {"message": f"unreadable event {line[:200]!r}", "code": 502}}
    return event if isinstance(event, dict) else {"error": {"message": "event is not an object", "code": 502}}


async def asse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        event = sse_event(line)
        if event is not None:
            yield event
