"""Streaming answers: server-sent events decoded into text deltas, then a final typed result.

``for delta in stream: ...`` yields text as it is generated; afterwards ``stream.result`` is the
whole answer (text, usage, ``model_version``, ``endpoint``). A stream does not fail over once
it has started: text already shown cannot be taken back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

import httpx

from loom.client.calls import MODEL_VERSION_HEADER, RESPONSE_ID_HEADER
from loom.client.dispatch import error_fields
from loom.client.errors import LoomAPIError, LoomClientError, LoomConnectionError
from loom.client.results import ChatReply, Generation

R = TypeVar("R", ChatReply, Generation)


class Decoder(Generic[R]):
    """Events in, deltas out; ``result`` once the final event has come."""

    def __init__(self, endpoint: str, headers: httpx.Headers) -> None:
        self.endpoint = endpoint
        self.session_id: str | None = None  # /chat/stream: known from the first event on
        self.stamp = {
            "endpoint": endpoint,
            "model_version": headers.get(MODEL_VERSION_HEADER),
            "response_id": headers.get(RESPONSE_ID_HEADER),
        }
        self.result: R | None = None

    def line(self, line: str) -> str | None:
        if not line.startswith("data:"):
            return None  # blank separators, comments, event names
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done()
            return None
        event = json.loads(data)
        if "error" in event:
            message, code, type_, param = error_fields(event)
            raise LoomAPIError(200, f"{message} (in the stream)", self.endpoint, code, type_, param)
        return self.event(event)

    def event(self, event: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def done(self) -> None:
        pass

    def finished(self) -> R:
        if self.result is None:
            raise LoomConnectionError(
                self.endpoint, "the stream ended before its final event", may_have_run=True
            )
        return self.result


class ChatDecoder(Decoder[ChatReply]):
    """``/chat/stream``: ``{"session_id", "delta"}`` events, then one with ``done: true``."""

    def event(self, event: dict[str, Any]) -> str | None:
        self.session_id = event.get("session_id") or self.session_id
        if event.get("done"):
            self.result = ChatReply.model_validate({**event, **{k: v for k, v in self.stamp.items() if v}})
            return None
        return str(event.get("delta") or "") or None


class TextDecoder(Decoder[Generation]):
    """``/v1/completions`` chunks (choice 0), a usage chunk, then ``[DONE]``."""

    def __init__(self, endpoint: str, headers: httpx.Headers) -> None:
        super().__init__(endpoint, headers)
        self.text, self.fields = "", dict[str, Any]()

    def event(self, event: dict[str, Any]) -> str | None:
        self.fields["model"] = event.get("model")
        self.fields["model_version"] = event.get("model_version") or self.stamp["model_version"]
        if event.get("usage"):
            self.fields["usage"] = event["usage"]
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.fields["finish_reason"] = choice["finish_reason"]
            piece = str(choice.get("text") or "")
            self.text += piece
            return piece or None
        return None

    def done(self) -> None:
        fields = {**self.stamp, **{k: v for k, v in self.fields.items() if v is not None}}
        self.result = Generation.model_validate({**fields, "text": self.text})


class Stream(Generic[R]):
    """A sync stream of text deltas; use it in a ``with`` block (or iterate it to the end)."""

    def __init__(self, response: httpx.Response, decoder: Decoder[R], on_done: Any = None) -> None:
        self.response, self.on_done = response, on_done
        self.decoder: Decoder[R] = decoder

    @property
    def endpoint(self) -> str:
        return self.decoder.endpoint

    @property
    def result(self) -> R:
        """The whole answer; available once the stream has been read to its end."""
        return self.decoder.finished()

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self.response.iter_lines():
                delta = self.decoder.line(line)
                if delta:
                    yield delta
        except httpx.TransportError as exc:
            raise _cut(self.endpoint, exc) from exc
        finally:
            self.response.close()
        _finish(self.decoder, self.on_done)

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[R]):
    """An async stream of text deltas: ``async for delta in stream``."""

    def __init__(self, response: httpx.Response, decoder: Decoder[R], on_done: Any = None) -> None:
        self.response, self.on_done = response, on_done
        self.decoder: Decoder[R] = decoder

    @property
    def endpoint(self) -> str:
        return self.decoder.endpoint

    @property
    def result(self) -> R:
        return self.decoder.finished()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self.response.aiter_lines():
                delta = self.decoder.line(line)
                if delta:
                    yield delta
        except httpx.TransportError as exc:
            raise _cut(self.endpoint, exc) from exc
        finally:
            await self.response.aclose()
        _finish(self.decoder, self.on_done)

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[R]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _cut(endpoint: str, exc: httpx.TransportError) -> LoomClientError:
    return LoomConnectionError(
        endpoint, f"the stream was cut: {type(exc).__name__}: {exc}", may_have_run=True
    )


def _finish(decoder: Decoder[Any], on_done: Any) -> None:
    result = decoder.finished()  # a stream that ended without its final event raises here
    if on_done is not None:
        on_done(result)


def decoder_for(kind: str, endpoint: str, headers: httpx.Headers) -> Decoder[Any]:
    return ChatDecoder(endpoint, headers) if kind == "chat" else TextDecoder(endpoint, headers)
