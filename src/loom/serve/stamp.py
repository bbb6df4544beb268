"""Stamping a response: its id and the version that answers, fixed once the request is resolved
and before any output goes out (so a stream's headers carry them), and its row in the request
log (:mod:`loom.serve.requestlog`) once it is done."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom.serve.requestlog import MODEL_VERSION_HEADER, RESPONSE_ID_HEADER, LoggedResponse, RequestLog

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from loom.serve.registry import Target


@dataclass
class Stamp:
    """One response's identity, fixed once its request is resolved and before any output goes
    out (so a stream's headers carry it): the id, the version answering, and what gets logged."""

    response_id: str
    model_version: dict[str, str | None]
    route: str
    agent: str | None
    input: dict[str, Any] | str | None
    request_log: RequestLog | None = None  # None: the server logs nothing
    answered_by: str | None = None  # no model of this server answered: the fallback step that did
    arrived: float = field(default_factory=time.time)  # Unix seconds
    started: float = field(default_factory=time.monotonic)

    @property
    def version(self) -> str:
        """The concrete adapter version, else the base's (else the fallback step that answered)."""
        mv = self.model_version
        return mv.get("adapter") or mv.get("base") or self.answered_by or "none"

    def headers(self) -> dict[str, str]:
        return {RESPONSE_ID_HEADER: self.response_id, MODEL_VERSION_HEADER: self.version}

    def apply(self, response: Response) -> None:
        response.headers.update(self.headers())

    def done(
        self, output: str | list[str] | None, status: str = "ok", latency_s: float | None = None
    ) -> None:
        """Log the response (a queue put: safe on the event loop). Several outputs (choices)
        are logged as a JSON list of their texts."""
        if self.request_log is None:
            return
        if isinstance(output, list):
            output = output[0] if len(output) == 1 else json.dumps(output, ensure_ascii=False)
        if latency_s is None:
            latency_s = round(time.monotonic() - self.started, 4)
        self.request_log.record(
            LoggedResponse(
                self.response_id,
                self.arrived,
                self.route,
                self.agent,
                self.model_version,
                self.input,
                output,
                latency_s,
                status,
            )
        )

    @contextmanager
    def streaming(self, texts: list[str]) -> Iterator[None]:
        """Log a stream when it ends: ``ok`` when the block completes, ``cancelled`` when the
        client goes away, ``error`` on a failure (with the text sent so far)."""
        try:
            yield
        except (GeneratorExit, asyncio.CancelledError):
            self.done(texts, "cancelled")
            raise
        except BaseException:
            self.done(texts, "error")
            raise
        self.done(texts)


def request_log_of(request: Request) -> RequestLog | None:
    found: RequestLog | None = getattr(request.app.state, "request_log", None)
    return found


def route_of(request: Request) -> str:
    return getattr(request.scope.get("route"), "path", None) or request.url.path


def stamp_for(
    request: Request, target: Target, response_id: str, payload: dict[str, Any] | str | None
) -> Stamp:
    """The stamp of a request resolved to ``target``: its adapter version (resolved before any
    output) or, without an adapter, the served base."""
    service = request.app.state.service
    base = service.engine.base_ref if service.engine is not None else None
    agents = service.registry.agents if service.registry is not None else {}
    return Stamp(
        response_id,
        {"base": base, "adapter": (target.version or target.adapter) if target.adapter else None},
        route_of(request),
        target.model if target.model in agents else None,
        payload,
        request_log_of(request),
    )
