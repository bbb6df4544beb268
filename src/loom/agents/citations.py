"""Citation markers in agent answers: ``<<SRC:domain:entity_id>>``.

An agent cites a source by writing ``<<SRC:squad:Huguenot#p3>>`` in its answer. This module
finds those markers (:func:`parse_citations`), removes them (:func:`strip_citations`) and
renders them as markdown links or a structured list once a registry has resolved them.

Grammar (decided here, relied on by tests):

- ``domain`` is ``[a-z0-9_-]``, 1 to 64 characters;
- ``entity_id`` is 1 to 256 characters, none of them whitespace, a control character, ``<``
  or ``>``. Everything else is allowed (``#``, ``_``, ``,``, ``.``, ``-``, ``/``, ``(``,
  ``)``, ``:``, digits, unicode letters…), so a source id is split at its FIRST colon;
- up to 8 spaces or tabs are accepted around the domain and the entity id and stripped
  (``<<SRC: squad : X >>`` cites ``squad:X``); newlines inside a marker are not;
- ``SRC`` is upper case; anything else (``<<src:…>>``, ``<<SRC:>>``, ``<<SRC:squad>>``,
  an unclosed ``<<SRC:squad:x``, an id over 256 characters) is plain text, never an error;
- nested markers: ``<<SRC:a:<<SRC:b:c>>>>`` yields only the inner, well-formed ``b:c``.

Every quantifier in the pattern is bounded and its character classes do not overlap, so a
match attempt does at most a few hundred steps and parsing is linear in the text length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_DOMAIN_LEN = 64
MAX_ENTITY_ID_LEN = 256
_PAD = r"[ \t]{0,8}"
_DOMAIN = rf"[a-z0-9_-]{{1,{MAX_DOMAIN_LEN}}}"
_ENTITY = rf"[^\s<>\x00-\x1f\x7f]{{1,{MAX_ENTITY_ID_LEN}}}"
_MARKER_BODY = rf"<<SRC:{_PAD}(?P<domain>{_DOMAIN}){_PAD}:{_PAD}(?P<entity>{_ENTITY}){_PAD}>>"
_MARKER = re.compile(_MARKER_BODY)
_DOMAIN_RE = re.compile(_DOMAIN)
_ENTITY_RE = re.compile(_ENTITY)
_OPEN = "<<SRC:"
SOURCE_ID_RULE = (
    f"'domain:entity_id', the domain 1-{MAX_DOMAIN_LEN} lowercase letters, digits, '_' or '-', "
    f"the entity id 1-{MAX_ENTITY_ID_LEN} characters without whitespace, '<' or '>'"
)
# A marker can never be longer than this: what the bounded quantifiers above add up to.
MAX_MARKER_LEN = len(_OPEN) + 8 + MAX_DOMAIN_LEN + 8 + 1 + 8 + MAX_ENTITY_ID_LEN + 8 + 2


@dataclass(frozen=True)
class Citation:
    """One marker in a text: what it cites and where it is (``text[start:end]``)."""

    domain: str
    entity_id: str
    start: int
    end: int

    @property
    def source_id(self) -> str:
        return f"{self.domain}:{self.entity_id}"


@dataclass(frozen=True)
class Source:
    """A citable source: its id (``domain:entity_id``), display name and optional URL."""

    id: str
    name: str
    url: str | None = None


@dataclass(frozen=True)
class ResolvedCitation:
    """A citation with its registry entry, or ``source=None`` when the registry lacks it."""

    citation: Citation
    source: Source | None

    @property
    def known(self) -> bool:
        return self.source is not None

    @property
    def source_id(self) -> str:
        return self.citation.source_id


def parse_citations(text: str) -> list[Citation]:
    """Every well-formed marker in ``text``, in order, duplicates kept. Never raises."""
    return [
        Citation(m.group("domain"), m.group("entity"), m.start(), m.end()) for m in _MARKER.finditer(text)
    ]


def unique_citations(citations: Iterable[Citation]) -> list[Citation]:
    """The first citation of each source id, in order of first appearance."""
    seen: set[str] = set()
    out: list[Citation] = []
    for c in citations:
        if c.source_id not in seen:
            seen.add(c.source_id)
            out.append(c)
    return out


def format_marker(domain: str, entity_id: str) -> str:
    """The marker an agent writes to cite ``domain:entity_id`` (checked against the grammar)."""
    if not _DOMAIN_RE.fullmatch(domain) or not _ENTITY_RE.fullmatch(entity_id):
        raise ValueError(f"cannot cite {domain}:{entity_id!r}: a source id must be {SOURCE_ID_RULE}")
    return f"{_OPEN}{domain}:{entity_id}>>"


def split_source_id(source_id: str) -> tuple[str, str] | None:
    """``"squad:Huguenot#p3"`` -> ``("squad", "Huguenot#p3")``; None if a marker could not cite it."""
    domain, sep, entity_id = source_id.partition(":")
    if not sep or not _DOMAIN_RE.fullmatch(domain) or not _ENTITY_RE.fullmatch(entity_id):
        return None
    return domain, entity_id


# --- removing markers -------------------------------------------------------------------

_CLOSING_PUNCT = frozenset(".,;:!?)]}")


def _rstrip_parts(parts: list[str]) -> None:
    while parts:
        kept = parts[-1].rstrip(" \t")
        if kept:
            parts[-1] = kept
            return
        parts.pop()


def _remove_once(text: str, citations: list[Citation]) -> str:
    """Cut the markers out, tidying spaces where each one was: no double space, no space
    before punctuation or a line end, no space at the start of a line. Linear: it only looks
    at the characters next to each cut."""
    parts: list[str] = []  # never holds an empty string, so parts[-1][-1] is the last char
    prev = 0
    for c in citations:
        if c.start > prev:
            parts.append(text[prev : c.start])
        prev = c.end
        last = parts[-1][-1] if parts else ""
        if text[prev : prev + 1] in (" ", "\t") and last in ("", " ", "\t", "\n"):
            while prev < len(text) and text[prev] in " \t":
                prev += 1
        after = text[prev : prev + 1]
        if after in ("", "\n") or after in _CLOSING_PUNCT:
            _rstrip_parts(parts)
    parts.append(text[prev:])
    return "".join(parts)


def _reduce(text: str) -> str:
    """Remove markers until none is left, in one pass with a stack (linear time).

    Cutting a marker out can make a new one (``<<SRC:a:x<<SRC:b:c>>>>`` leaves ``<<SRC:a:x>>``).
    Only the latest unfinished ``<<SRC:`` can end at a ``>>`` (no marker part contains ``<`` or
    ``>``), so each ``>>`` checks one start, which is then either removed or dead for good."""
    out: list[str] = []
    starts: list[int] = []  # indexes in out where a "<<SRC:" begins, oldest first
    for ch in text:
        out.append(ch)
        if ch == ":" and len(out) >= len(_OPEN) and "".join(out[-len(_OPEN) :]) == _OPEN:
            starts.append(len(out) - len(_OPEN))
        elif ch == ">" and len(out) >= 2 and out[-2] == ">" and starts:
            s = starts.pop()
            if len(out) - s <= MAX_MARKER_LEN and _MARKER.fullmatch("".join(out[s:])):
                del out[s:]
    return "".join(out)


def strip_citations(text: str) -> str:
    """``text`` without any marker, spaces tidied where markers were; the rest is untouched."""
    stripped = _remove_once(text, parse_citations(text))
    for _ in range(3):  # cutting a nested marker out can complete the one around it
        cites = parse_citations(stripped)
        if not cites:
            return stripped
        stripped = _remove_once(stripped, cites)
    return _reduce(stripped) if _MARKER.search(stripped) else stripped  # deeper: no tidying


# --- rendering -------------------------------------------------------------------------


def _md_text(s: str) -> str:
    return s.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _md_url(url: str) -> str:
    # Percent-encode what would end or confuse a markdown link destination.
    for ch, code in ((" ", "%20"), ("(", "%28"), (")", "%29"), ("<", "%3C"), (">", "%3E")):
        url = url.replace(ch, code)
    return url


def _lookup(resolved: Iterable[ResolvedCitation]) -> dict[str, Source | None]:
    table: dict[str, Source | None] = {}
    for r in resolved:
        if table.get(r.source_id) is None:
            table[r.source_id] = r.source
    return table


def _link(source_id: str, source: Source | None) -> str:
    if source is None:
        return f"[{_md_text(source_id)}]"
    if source.url:
        return f"[{_md_text(source.name)}]({_md_url(source.url)})"
    return f"[{_md_text(source.name)}]"


def render_markdown(text: str, resolved: Iterable[ResolvedCitation]) -> str:
    """Each marker replaced by ``[name](url)``, ``[name]`` (no URL) or ``[domain:id]`` (unknown).

    ``resolved`` is what the registry made of this text's citations; a marker missing from it
    renders as unknown."""
    table = _lookup(resolved)
    parts: list[str] = []
    prev = 0
    for c in parse_citations(text):
        parts += [text[prev : c.start], _link(c.source_id, table.get(c.source_id))]
        prev = c.end
    parts.append(text[prev:])
    return "".join(parts)


def render_list(resolved: Iterable[ResolvedCitation]) -> list[dict[str, Any]]:
    """One dict per distinct source, in order of first citation: ``id``, ``domain``,
    ``entity_id``, ``name`` (the id itself when unknown), ``url`` (or None) and ``known``."""
    out: list[dict[str, Any]] = []
    for source_id, source in _lookup(resolved).items():
        domain, _, entity_id = source_id.partition(":")
        out.append(
            {
                "id": source_id,
                "domain": domain,
                "entity_id": entity_id,
                "name": source.name if source else source_id,
                "url": source.url if source else None,
                "known": source is not None,
            }
        )
    return out
