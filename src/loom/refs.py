"""The one ref parser used everywhere (CLI, agent map, API ``model`` field).

Forms:
- ``name@version`` / ``name@alias``; a bare ``name`` means ``name@current``;
- ``hf:org/model`` names a hub model (optionally ``hf:org/model@revision``);
- a path (starts with ``/``, ``./``, ``../`` or ``~``) names a local directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loom.errors import RefError

DEFAULT_ALIAS = "current"

# Names and versions become folder names in the store, so they must never
# contain separators or dot-only segments (no path traversal through a ref).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe store name, else raise RefError."""
    if not _NAME_RE.match(value) or ".." in value:
        raise RefError(
            f"invalid {what} {value!r}: use 1-128 characters from letters, digits, '.', '_' "
            f"and '-', starting with a letter or digit (no '/', no '..')"
        )
    return value


@dataclass(frozen=True)
class Ref:
    """A parsed reference to a store artifact, a hub model or a local path."""

    kind: Literal["store", "hub", "path"]
    name: str
    selector: str | None = None  # version or alias for store refs, revision for hub refs

    @property
    def tag(self) -> str:
        """Version-or-alias to resolve (``current`` when none was given)."""
        return self.selector or DEFAULT_ALIAS

    def __str__(self) -> str:
        if self.kind == "path":
            return self.name
        prefix = "hf:" if self.kind == "hub" else ""
        return f"{prefix}{self.name}@{self.selector}" if self.selector else f"{prefix}{self.name}"


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text in {".", ".."}


def parse_ref(text: str) -> Ref:
    """Parse a ref string; raise RefError naming the input and the expected forms."""
    text = text.strip()
    if not text:
        raise RefError("empty ref: give 'name', 'name@version', 'hf:org/model' or a path")
    if _looks_like_path(text):
        return Ref(kind="path", name=str(Path(text).expanduser()))
    if text.startswith("hf:"):
        body, _, rev = text[3:].partition("@")
        if not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", body):
            raise RefError(f"invalid hub ref {text!r}: expected 'hf:org/model' or 'hf:org/model@rev'")
        return Ref(kind="hub", name=body, selector=rev or None)
    name, sep, selector = text.partition("@")
    if "/" in name:
        raise RefError(
            f"invalid ref {text!r}: store names have no '/'; for a hub model write 'hf:{name}', "
            f"for a local directory write './{name}'"
        )
    validate_name(name, "name")
    if sep:
        validate_name(selector, "version or alias")
        return Ref(kind="store", name=name, selector=selector)
    return Ref(kind="store", name=name)
