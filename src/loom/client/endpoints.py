"""The endpoints a client knows, in priority order, and which of them are up.

An endpoint that fails (refused, timed out, 503 while loading) is marked down for a cooldown that
doubles on each failure in a row. Calls go to the endpoints that are up, in priority order; once
a down endpoint's cooldown is over it is probed (``GET /health``) before a call goes to it, so the
first endpoint is preferred again as soon as it is back. Endpoints still cooling down are tried
last, so a client whose endpoints all blipped still tries them instead of failing outright."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loom.client.errors import LoomClientError


@dataclass
class EndpointState:
    url: str
    down_until: float = 0.0  # time.monotonic(); 0: up
    failures_in_a_row: int = 0
    last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.down_until == 0.0


@dataclass(frozen=True)
class Slot:
    """One endpoint to try, and whether it must pass a health probe first."""

    url: str
    probe: bool


def normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LoomClientError(
            f"endpoint {url!r} is not an http:// or https:// URL; give e.g. http://host:8000"
        )
    if url.endswith("/v1"):
        url = url[: -len("/v1")]  # the SDK adds /v1 itself where a route has it
    return url


class Endpoints:
    """Thread-safe: a sync client may be shared by threads, an async one by tasks."""

    def __init__(self, urls: list[str], cooldown_s: float = 5.0, max_cooldown_s: float = 60.0) -> None:
        if not urls:
            raise LoomClientError("no endpoints given; pass Client('http://host:8000') or a list of URLs")
        ordered = list(dict.fromkeys(normalize(u) for u in urls))
        self.states = {u: EndpointState(u) for u in ordered}
        self.cooldown_s, self.max_cooldown_s = cooldown_s, max_cooldown_s
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return list(self.states)

    def plan(self, prefer: str | None = None, pin: str | None = None) -> list[Slot]:
        """The order to try endpoints in for one call: up ones (and due probes) by priority, then
        those still cooling down. ``prefer`` goes first (the server that holds a session);
        ``pin`` is the only one tried."""
        if pin is not None:
            return [Slot(normalize(pin), probe=False)]
        now = time.monotonic()
        with self._lock:
            states = list(self.states.values())
            preferred = normalize(prefer) if prefer else None
            if preferred in self.states:
                states.sort(key=lambda s: s.url != preferred)  # stable: the rest keep their order
            ready = [Slot(s.url, probe=not s.up) for s in states if s.up or s.down_until <= now]
            cooling = sorted(
                (s for s in states if not s.up and s.down_until > now), key=lambda s: s.down_until
            )
        return ready + [Slot(s.url, probe=False) for s in cooling]

    def mark_down(self, url: str, reason: str) -> None:
        with self._lock:
            state = self.states.get(url)
            if state is None:  # a pinned URL outside the list: nothing to remember
                return
            state.failures_in_a_row += 1
            cooldown = min(self.max_cooldown_s, self.cooldown_s * 2 ** (state.failures_in_a_row - 1))
            state.down_until, state.last_error = time.monotonic() + cooldown, reason

    def mark_up(self, url: str) -> None:
        with self._lock:
            state = self.states.get(url)
            if state is not None:
                state.down_until, state.failures_in_a_row, state.last_error = 0.0, 0, None

    def snapshot(self) -> list[EndpointState]:
        """A copy of every endpoint's state, in priority order (for logs and dashboards)."""
        with self._lock:
            return [
                EndpointState(s.url, s.down_until, s.failures_in_a_row, s.last_error)
                for s in self.states.values()
            ]


class Sessions:
    """Which endpoint holds each conversation, so its follow-ups go there first (bounded)."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._where: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str | None) -> str | None:
        with self._lock:
            return self._where.get(session_id) if session_id else None

    def remember(self, session_id: str, endpoint: str) -> None:
        with self._lock:
            self._where.pop(session_id, None)
            self._where[session_id] = endpoint
            while len(self._where) > self.LIMIT:
                del self._where[next(iter(self._where))]
