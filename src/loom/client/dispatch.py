"""One call's walk over the endpoints: which to try next, and what each outcome allows.

The rule that keeps failover honest: a request that may have run on a server (the connection was
made and the body sent, then the answer never came or was a 5xx) is sent nowhere else unless the
call is idempotent (GET, DELETE) or the caller said ``retry_unsafe=True``. A request that cannot
have run (connection refused or timed out, 503 from a server that is loading or draining, 429 from
one whose queue is full) always moves on. When every endpoint of a pass failed that way, another
pass follows (``RetryPolicy.max_retries``), after an exponential backoff with jitter.

The sync and async clients drive a :class:`Dispatch` with their own I/O; the decisions live here once."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from loom.client.endpoints import Endpoints, Slot
from loom.client.errors import (
    AllEndpointsFailed,
    EndpointFailure,
    LoomAPIError,
    LoomClientError,
    LoomConnectionError,
)

# Loom's 503 codes for a server that cannot take work yet (or any more): the request did not run.
NOT_READY = frozenset({"loading", "draining", "restarting", "failed", "agent_unavailable"})
# The request never reached a server whole: it cannot have run anywhere.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteError, httpx.WriteTimeout)
UNSAFE_HINT = (
    "it was not re-sent to another endpoint because it may have run there; pass retry_unsafe=True "
    "to allow that (fine for plain generation; a chat turn may then be saved twice in a shared "
    "conversation database)"
)


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries``: extra passes over every endpoint after a pass whose failures were all safe."""

    max_retries: int = 2
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential with equal jitter (half fixed, half random), never under a server's
        Retry-After (capped: a hint, not a promise to wait minutes)."""
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        delay = base / 2 + random.uniform(0, base / 2)
        return max(delay, min(retry_after or 0.0, self.max_backoff_s))


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Verdict:
    """What one failed attempt means for the call."""

    failure: EndpointFailure
    error: LoomClientError  # raised when the call may not move on
    retry: Literal["never", "safe", "unsafe"]
    mark_down: bool
    retry_after: float | None = None


def error_fields(body: Any) -> tuple[str, str | None, str | None, str | None]:
    """(message, code, type, param) from Loom's/OpenAI's error shape, or from anything else."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err), err.get("code"), err.get("type"), err.get("param")
    if isinstance(body, dict) and "status" in body:  # /health's {"status": "loading", "error"?: ...}
        return str(body.get("error") or f"the server is {body['status']}"), str(body["status"]), None, None
    return (str(body)[:300] or "no body"), None, None, None


def status_verdict(url: str, status: int, body: Any, headers: httpx.Headers) -> Verdict:
    message, code, type_, param = error_fields(body)
    error = LoomAPIError(status, message, url, code, type_, param)
    failure = EndpointFailure(url, f"{status}{f' {code}' if code else ''}: {message}", status)
    retry_after = _seconds(headers.get("retry-after"))
    if status == 503 and (code in NOT_READY or type_ == "service_unavailable" or "shutting down" in message):
        return Verdict(failure, error, "safe", mark_down=True, retry_after=retry_after)
    if status == 429:  # the queue was full: refused before running; busy is not down
        return Verdict(failure, error, "safe", mark_down=False, retry_after=retry_after)
    if status >= 500:
        return Verdict(failure, error, "unsafe", mark_down=status in (502, 503, 504))
    return Verdict(failure, error, "never", mark_down=False)


def transport_verdict(url: str, exc: httpx.TransportError) -> Verdict:
    kind = type(exc).__name__
    detail = f"{kind}: {exc}" if str(exc) else kind
    if isinstance(exc, NOT_SENT):
        error = LoomConnectionError(url, f"{detail} (the request was not sent)", may_have_run=False)
        return Verdict(EndpointFailure(url, detail), error, "safe", mark_down=True)
    error = LoomConnectionError(url, f"{detail}; {UNSAFE_HINT}", may_have_run=True)
    return Verdict(
        EndpointFailure(url, f"{detail} (after the request was sent)"), error, "unsafe", mark_down=True
    )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None  # an HTTP date: not worth parsing for a hint


class Dispatch:
    def __init__(
        self,
        endpoints: Endpoints,
        policy: RetryPolicy,
        unsafe_ok: bool,
        prefer: str | None = None,
        pin: str | None = None,
    ) -> None:
        self.endpoints, self.policy, self.unsafe_ok = endpoints, policy, unsafe_ok
        self.prefer, self.pin = prefer, pin
        self.failures: list[EndpointFailure] = []
        self.attempt = 0
        self.retry_after: float | None = None
        self.queue = endpoints.plan(prefer, pin)

    def next(self) -> Slot | Wait | None:
        """The next endpoint, a pause before another pass, or None when the call is out of tries."""
        if self.queue:
            return self.queue.pop(0)
        if self.attempt >= self.policy.max_retries:
            return None
        wait = Wait(self.policy.delay(self.attempt, self.retry_after))
        self.attempt += 1
        self.queue = self.endpoints.plan(self.prefer, self.pin)
        return wait

    def probe_failed(self, url: str, reason: str) -> None:
        self.endpoints.mark_down(url, reason)
        self.failures.append(EndpointFailure(url, f"still down (health probe: {reason})"))

    def succeeded(self, url: str) -> None:
        self.endpoints.mark_up(url)

    def failed(self, verdict: Verdict) -> None:
        """Record a failed attempt; raise its error when the call may not move on."""
        url = verdict.failure.endpoint
        if verdict.mark_down:
            self.endpoints.mark_down(url, verdict.failure.reason)
        self.failures.append(verdict.failure)
        if verdict.retry_after is not None:
            self.retry_after = max(self.retry_after or 0.0, verdict.retry_after)
        if verdict.retry == "never":
            raise verdict.error
        if verdict.retry == "unsafe" and not self.unsafe_ok:
            if isinstance(verdict.error, LoomAPIError):
                verdict.error.args = (f"{verdict.error.args[0]}; {UNSAFE_HINT}",)
            raise verdict.error

    def exhausted(self) -> AllEndpointsFailed:
        return AllEndpointsFailed(self.failures)
