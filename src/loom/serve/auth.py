"""Bearer keys: LOOM_API_KEY for the API, LOOM_ADMIN_KEY for admin routes (pools, adapters),
and the start-up check that says (or, with ``--require-keys``, refuses) when a server is open."""

from __future__ import annotations

import ipaddress
import secrets

from fastapi import Request

from loom.conversations.types import owner_id
from loom.errors import LoomError
from loom.serve.config import ServeConfig
from loom.serve.errors import APIError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname or "": it may resolve to (or bind) any interface


def exposure_warnings(cfg: ServeConfig) -> list[str]:
    """What an operator must hear at start: routes anyone who reaches the port may call.
    With ``cfg.require_keys`` an open server is refused instead (LoomError)."""
    if cfg.require_keys and cfg.api_key is None:
        raise LoomError(
            "--require-keys is set but LOOM_API_KEY is empty: set LOOM_API_KEY (clients) and "
            "LOOM_ADMIN_KEY (pools, adapter loading) in the environment, or drop --require-keys"
        )
    warnings: list[str] = []
    if cfg.api_key is None and not is_loopback(cfg.host):
        warnings.append(
            f"--host {cfg.host} listens beyond this machine and LOOM_API_KEY is not set: anyone who "
            "reaches the port can generate; set LOOM_API_KEY (or start with --require-keys)"
        )
    if cfg.api_key is None and cfg.admin_key is None:
        warnings.append(
            "no LOOM_API_KEY or LOOM_ADMIN_KEY: the admin routes (/workers/pools, /v1/load_lora_adapter) "
            "are open to every caller; set LOOM_ADMIN_KEY (and LOOM_API_KEY) to close them"
        )
    return warnings


def key_id(request: Request) -> str:
    """Who is calling, for binding state (conversations) to a caller: a digest of the bearer
    token (never the token itself), or "" on a server without keys."""
    token = _bearer(request)
    if request.app.state.service.cfg.api_key is None:
        return ""
    return owner_id(token)  # the same digest `loom conversations import --key-env` computes


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and secrets.compare_digest(token.encode(), key.encode())


def require_key(request: Request) -> None:
    cfg = request.app.state.service.cfg
    if cfg.api_key is None:
        return
    token = _bearer(request)
    if not (_matches(token, cfg.api_key) or _matches(token, cfg.admin_key)):
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>' with the server's LOOM_API_KEY",
            "authentication_error",
            "invalid_api_key",
        )


def require_admin(request: Request) -> None:
    cfg = request.app.state.service.cfg
    if cfg.admin_key is None:
        if cfg.api_key is None:
            return  # no keys at all: a local, trusted setup
        raise APIError(
            403,
            "admin routes are disabled on this server: start it with LOOM_ADMIN_KEY set",
            "permission_error",
            "admin_disabled",
        )
    token = _bearer(request)
    if not _matches(token, cfg.admin_key):
        status = 401 if token is None else 403
        raise APIError(
            status,
            "this route needs the admin key: send 'Authorization: Bearer <LOOM_ADMIN_KEY>'",
            "authentication_error" if status == 401 else "permission_error",
            "admin_key_required",
        )
