"""Server-sent events: framing, and merging several generations into one stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from loom.engine.types import StreamChunk
from loom.errors import LoomError
from loom.serve.errors import APIError

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def error_event(exc: BaseException) -> bytes:
    """An error after the 200 and the headers went out: OpenAI-shaped, in the stream (as vLLM does)."""
    if isinstance(exc, APIError):
        return event(
            {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
        )
    return event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})


async def merge(streams: list[AsyncGenerator[StreamChunk, None]]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(index, chunk) from all streams as they come; closing this closes every stream."""
    if len(streams) == 1:  # the common case, without the relay tasks
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, StreamChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[StreamChunk, None]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, None))
        except BaseException as exc:
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def streaming(admission: Any, body: AsyncIterator[bytes], done: bool) -> StreamingResponse:
    """An SSE response whose admission is released when the stream ends, fails, or is never
    iterated at all (a client gone before the headers went out): ``weakref.finalize`` covers
    the last case, where a never-started generator has no ``finally`` to run."""

    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for piece in body:
                yield piece
        except (APIError, LoomError) as exc:
            yield error_event(exc)
            if done:
                yield DONE
        finally:
            admission.release()

    gen = guarded()
    weakref.finalize(gen, _release_on_loop, asyncio.get_running_loop(), admission)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(gen, media_type="text/event-stream", headers=headers)


def _release_on_loop(loop: asyncio.AbstractEventLoop, admission: Any) -> None:
    """The garbage collector may run this on any thread; the counter belongs to the loop."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to count
        loop.call_soon_threadsafe(admission.release)
