"""Streaming sha256 over files, with an optional progress callback."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

CHUNK = 4 * 1024 * 1024

# Called with the number of bytes just processed; the CLI plugs a rich bar in.
Progress = Callable[[int], None]


def sha256_stream(stream: BinaryIO, progress: Progress | None = None) -> tuple[str, int]:
    """Return (hex digest, size) of everything readable from ``stream``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest(), size


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
