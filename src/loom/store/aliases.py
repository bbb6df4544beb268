"""Alias pointer files: ``aliases/<alias>.json`` holding a version and its history.

Rollback pops the stack of earlier targets, so repeated rollbacks walk back
through history; every move is appended to ``history`` for auditing.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from loom.errors import IntegrityError


class AliasEvent(BaseModel):
    action: Literal["set", "rollback"]
    version: str
    previous: str | None
    at: datetime
    by: str


class AliasFile(BaseModel):
    alias: str
    version: str
    previous: list[str] = Field(default_factory=list)  # stack: last = most recent earlier target
    history: list[AliasEvent] = Field(default_factory=list)

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


def parse_alias(data: bytes, where: str) -> AliasFile:
    try:
        return AliasFile.model_validate(json.loads(data))
    except ValueError as exc:
        raise IntegrityError(f"{where}: alias file is damaged ({exc}); set it again") from None


def event(action: Literal["set", "rollback"], version: str, previous: str | None) -> AliasEvent:
    return AliasEvent(
        action=action,
        version=version,
        previous=previous,
        at=datetime.now(timezone.utc),
        by=current_user(),
    )


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
