"""Fallback steps that are not a model of this engine: a Python entry point (the "live tool
call" of existing deployments) and an OpenAI-compatible endpoint (a remote Loom). The payloads of
a batch are called side by side on a bounded pool, under one deadline per step: a hung tool or
endpoint costs its payloads that step, never the batch or the server's threads for good."""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import httpx

from loom.agents.result import Generated
from loom.errors import LoomError

log = logging.getLogger("loom.agents")
# Shared by every runtime: tool calls are I/O-bound, and a call still running past its deadline
# keeps its thread until it returns (Python cannot kill a thread), so the pool bounds that too.
POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="loom-agent-tool")

Call = Callable[[], Generated]


def run_calls(calls: Sequence[Call], timeout_s: float, what: str) -> list[Generated]:
    """Run ``calls`` side by side; one past the step's deadline (or raising) fails alone."""
    futures: list[Future[Generated]] = [POOL.submit(c) for c in calls]
    deadline = time.monotonic() + timeout_s
    out = []
    for fut in futures:
        try:
            out.append(fut.result(timeout=max(deadline - time.monotonic(), 0.0)))
        except FutureTimeout:
            fut.cancel()
            out.append(Generated("", error=f"{what} timed out after {timeout_s:g} s", error_kind="timeout"))
        except Exception as exc:  # a user's function must not fail the other payloads
            log.warning("%s failed: %r", what, exc)
            out.append(Generated("", error=f"{what} raised {type(exc).__name__}", error_kind="python"))
    return out


def python_call(entry_point: str) -> Callable[[dict[str, Any], str], Generated]:
    """``module:function(payload, agent) -> str | dict`` as a step."""
    module, _, attr = entry_point.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise LoomError(
            f"fallback python {entry_point!r} cannot be imported ({exc}); check the module path"
        ) from None

    def run(payload: dict[str, Any], agent: str) -> Generated:
        answer = fn(payload, agent)
        return Generated(answer if isinstance(answer, str) else json.dumps(answer))

    return run


def endpoint_call(
    url: str, model: str, api_key_env: str | None, timeout_s: float
) -> Callable[[list[dict[str, str]], dict[str, Any] | None], Generated]:
    """An OpenAI-compatible chat endpoint (a remote Loom: ``model`` names the agent there, and
    that server adds the agent's own system prompt). Its failures are answers with an error,
    never exceptions; their details go to the log, not to clients."""
    key = os.environ.get(api_key_env) if api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def run(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> Generated:
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0}
        if schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        endpoint = f"{url.rstrip('/')}/v1/chat/completions"
        try:
            r = httpx.post(endpoint, json=body, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as exc:
            log.warning("endpoint %s unreachable: %r", url, exc)
            return Generated("", error=f"endpoint {url} unreachable", error_kind="endpoint")
        if r.status_code != 200:
            return Generated("", error=f"endpoint {url} answered {r.status_code}", error_kind="endpoint")
        try:
            data = r.json()
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            return Generated(
                str(text),
                adapter=data.get("model"),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Generated("", error=f"endpoint {url} answered no chat completion", error_kind="endpoint")

    return run
