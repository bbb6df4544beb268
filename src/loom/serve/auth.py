"""Bearer keys: LOOM_API_KEY for the API, LOOM_ADMIN_KEY for admin routes (pools, adapters)."""

from __future__ import annotations

import secrets

from fastapi import Request

from loom.serve.errors import APIError


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
