"""Running the app under uvicorn: in the foreground (``loom serve``) or on a background thread
(the bench tool's ``--stub`` mode and the tests)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from loom.errors import LoomError

GRACEFUL_SHUTDOWN_S = 30  # running requests get this long to finish on SIGTERM/SIGINT


def run(app: Any, host: str, port: int, log_level: str = "info") -> None:
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float = 300.0) -> None:
    """Poll ``/health`` until 200; fail fast when start-up failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise LoomError(f"the server at {url} failed to start: {r.json().get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise LoomError(f"the server at {url} was not healthy within {timeout:.0f} s")


@contextmanager
def serve_in_thread(app: Any, port: int = 0, healthy: bool = True) -> Iterator[str]:
    """Serve ``app`` on loopback from a background thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="loom-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            if not thread.is_alive():
                raise LoomError(f"uvicorn did not start on {url}")
            time.sleep(0.02)
        if healthy:
            wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_S + 5)
