"""Output processing: a sampled token becomes text, a stop, or a stream chunk.

The last part of the engine's step (``loom.engine.step``): the sampler hands over one token
or one error per row, and this turns each into the request's state (generated ids,
incremental text, stop strings and stop ids, end of sequence, the length limit) and the
chunks its caller reads. A failure here (a tokenizer or processor raising on one row's
token) ends that request alone; the scheduler reaps finished rows afterwards.
"""

from __future__ import annotations

import time
from typing import Any

from loom.engine.request import Request
from loom.engine.sampling import SampleResult
from loom.engine.types import FinishReason, StreamChunk


class OutputProcessor:
    def __init__(self, eos_ids: set[int], max_len: int) -> None:
        """``max_len``: tokens a KV row holds; a request that fills its row ends with "length"."""
        self.eos_ids, self.max_len = eos_ids, max_len
        self.tokens_out = 0

    def process(self, reqs: list[Request], result: SampleResult) -> None:
        """Hand row i's token (or error) of ``result`` to ``reqs[i]``."""
        for i, req in enumerate(reqs):
            token = result.tokens[i]
            if req.cancelled:
                continue
            if token is None:
                fail_row(req, result.errors[i])
                continue
            try:
                self.accept(req, token)
            except Exception as exc:
                fail_row(req, f"output processing failed: {type(exc).__name__}: {exc}")

    def accept(self, req: Request, token: int) -> None:
        """Append ``token`` to ``req`` and stream any completed text; mark it finished
        (``req.meta["finish"]``) when the token ends it."""
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        req.token_times.append(now)
        req.generated.append(token)
        self.tokens_out += 1
        if req.processor is not None:
            req.processor.accept(token)
        is_eos = token in self.eos_ids and not req.params.ignore_eos
        stop_id = token in req.params.stop_token_ids
        if not (is_eos or stop_id):
            req.decoder.push(token)
        text = req.decoder.text
        stop_at = find_stop(text, req.params.stop)
        if stop_at is not None:
            req.meta["finish"] = ("stop", text[:stop_at])
        elif is_eos or stop_id or (req.processor is not None and req.processor.is_terminated()):
            req.meta["finish"] = ("stop", text + req.decoder.flush())
        elif len(req.generated) >= req.params.max_new_tokens or req.position + 1 >= self.max_len:
            req.meta["finish"] = ("length", text + req.decoder.flush())
        else:
            hold = max((len(s) for s in req.params.stop), default=1) - 1  # a stop string may be forming
            emit(req, text[: max(req.emitted_chars, len(text) - hold)], [token])


def fail_row(req: Request, message: str) -> None:
    """End one running request with an error at the next reap; the batch goes on."""
    req.error = message
    req.meta["finish"] = ("error", req.decoder.text)


def emit(req: Request, visible: str, ids: list[int], finished: bool = False, **kw: Any) -> None:
    """Send the part of ``visible`` the caller has not seen yet (and the final chunk)."""
    new = visible[req.emitted_chars :]
    req.emitted_chars = len(visible)
    if new or finished:
        req.sink.put(StreamChunk(req.id, new, ids, finished=finished, **kw))


def finish(req: Request, reason: FinishReason, text: str) -> None:
    """Send ``req``'s final chunk with its completion."""
    emit(req, text, [], finished=True, completion=req.completion(reason, text))


def finish_unstarted(req: Request, reason: FinishReason) -> None:
    """End a request that never ran (cancelled or failed while waiting)."""
    completion = req.completion(reason, "")
    req.sink.put(StreamChunk(req.id, "", [], finished=True, completion=completion))


def find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
