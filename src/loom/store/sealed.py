"""Sealed JSON files: a body stored with the sha256 of its canonical JSON.

Files written beside an immutable version after it was published (eval results) are not
in its manifest, so they carry their own checksum. The file is rendered one fixed way
(``render``), so ``unseal`` catches any changed byte: one that alters the body fails the
checksum, one anywhere else (whitespace, the checksum itself) fails the rendering.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from loom.errors import IntegrityError, LoomError


def canonical(body: dict[str, Any]) -> bytes:
    """The body's canonical JSON: sorted keys, compact separators, ASCII, no NaN."""
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise LoomError(
            f"cannot store this JSON body ({exc}); use plain JSON values (null instead of NaN)"
        ) from None


def body_sha256(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def render(body: dict[str, Any]) -> bytes:
    """The file's bytes: ``{"body": ..., "sha256": ...}``, indented for people to read."""
    sealed = {"body": body, "sha256": body_sha256(body)}
    return (json.dumps(sealed, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def unseal(data: bytes, where: str, fix: str) -> tuple[dict[str, Any], str]:
    """The body and its sha256, or IntegrityError naming ``where``, the damage and ``fix``."""
    try:
        sealed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{where} is damaged (not valid JSON: {exc}); {fix}") from None
    if not isinstance(sealed, dict) or not isinstance(sealed.get("body"), dict):
        raise IntegrityError(f"{where} is damaged (no JSON object under 'body'); {fix}")
    body: dict[str, Any] = sealed["body"]
    digest = body_sha256(body)
    if sealed.get("sha256") != digest:
        raise IntegrityError(
            f"{where} is damaged (its body hashes to sha256 {digest[:12]}…, the file says "
            f"{str(sealed.get('sha256'))[:12]}…); {fix}"
        )
    if render(body) != data:
        raise IntegrityError(f"{where} is damaged (its bytes differ from how it was written); {fix}")
    return body, digest
