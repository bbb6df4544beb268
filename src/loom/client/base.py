"""What the sync and async clients share: settings, endpoint state, and turning a :class:`Call`
into an HTTP request and an HTTP response into a :class:`Reply`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import httpx

from loom import __version__
from loom.client.calls import Call, Reply
from loom.client.dispatch import Dispatch, RetryPolicy
from loom.client.endpoints import Endpoints, EndpointState, Sessions
from loom.client.results import ChatReply, Conversation

DEFAULT_URL = "http://127.0.0.1:8000"


class BaseClient:
    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        probe_timeout: float = 2.0,
        max_retries: int = 2,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        cooldown_s: float = 5.0,
        retry_unsafe: bool = False,
    ) -> None:
        """``endpoints``: one URL or several in priority order (default: ``LOOM_URL``, comma-separated,
        else http://127.0.0.1:8000). ``api_key``/``admin_key`` default to ``LOOM_API_KEY``/``LOOM_ADMIN_KEY``.
        ``timeout``: seconds for connecting and for each read (a per-call ``timeout=`` overrides it);
        an endpoint that hangs past it fails over like one that refuses. ``max_retries``: extra passes
        over all endpoints (after ``backoff_s`` doubling, with jitter) when every one failed safely.
        ``cooldown_s``: how long a failed endpoint is skipped before a health probe may bring it back.
        ``retry_unsafe``: the default for calls whose request may already have run (see
        :mod:`loom.client.dispatch`)."""
        if endpoints is None:
            endpoints = os.environ.get("LOOM_URL") or DEFAULT_URL
        urls = (
            [u for u in endpoints.split(",") if u.strip()] if isinstance(endpoints, str) else list(endpoints)
        )
        self.endpoints = Endpoints(urls, cooldown_s=cooldown_s)
        self.sessions = Sessions()
        self.policy = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        self.api_key = api_key if api_key is not None else os.environ.get("LOOM_API_KEY") or None
        self.admin_key = admin_key if admin_key is not None else os.environ.get("LOOM_ADMIN_KEY") or None
        self.timeout, self.connect_timeout, self.probe_timeout = timeout, connect_timeout, probe_timeout
        self.retry_unsafe = retry_unsafe
        self._open()

    def _open(self) -> None:
        """The subclass's HTTP client and namespaces."""

    # ------------------------------------------------------------- state
    @property
    def endpoint_states(self) -> list[EndpointState]:
        """Each endpoint's state (up, or down until when and why), in priority order."""
        return self.endpoints.snapshot()

    # ------------------------------------------------------------- requests
    def _dispatch(self, call: Call[Any]) -> Dispatch:
        unsafe_ok = call.idempotent or call.retry_unsafe or self.retry_unsafe
        prefer = call.prefer or self.sessions.get(call.session)
        return Dispatch(self.endpoints, self.policy, unsafe_ok, prefer, call.pin)

    def _timeout(self, seconds: float | None) -> httpx.Timeout:
        total = self.timeout if seconds is None else seconds
        return httpx.Timeout(total, connect=min(total, self.connect_timeout))

    def _headers(self, call: Call[Any]) -> dict[str, str]:
        headers = {"User-Agent": f"loom-client/{__version__}"}
        key = (self.admin_key or self.api_key) if call.admin else self.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _request(self, http: httpx.Client | httpx.AsyncClient, url: str, call: Call[Any]) -> httpx.Request:
        return http.build_request(
            call.method,
            url + call.path,
            json=call.json,
            params=call.params,
            headers=self._headers(call),
            timeout=self._timeout(call.timeout),
        )

    def _probe_request(self, http: httpx.Client | httpx.AsyncClient, url: str) -> httpx.Request:
        return http.build_request("GET", f"{url}/health", timeout=self._timeout(self.probe_timeout))

    def _done(self, call: Call[Any], response: httpx.Response, url: str) -> Any:
        """The parsed answer of a successful response; remembers where a conversation lives."""
        result = call.parse(_reply(response, url))
        if isinstance(result, ChatReply | Conversation) and result.session_id:
            self.sessions.remember(result.session_id, url)
        return result


def _reply(response: httpx.Response, url: str) -> Reply:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Reply(response.status_code, response.headers, body, url)


def answered(response: httpx.Response, call: Call[Any]) -> bool:
    return response.is_success or response.status_code in call.accept


def failure_body(response: httpx.Response) -> Any:
    return _reply(response, "").body
