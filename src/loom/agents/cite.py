"""Citations in agent answers: parsed from ``<<SRC:domain:id>>`` markers and resolved through the
map's source registry; ids the registry does not know are logged and counted for its maintainers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.agents.citations import (
    ResolvedCitation,
    parse_citations,
    render_list,
    render_markdown,
    unique_citations,
)
from loom.agents.sources import SourceRegistry
from loom.agents.spec import AgentMapFile

log = logging.getLogger("loom.agents")


@dataclass
class Cited:
    """What an answer cites: one entry per source, and the answer with markdown links."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    markdown: str | None = None  # None when nothing is cited


CitationHook = Callable[[Any, str], Cited]


def open_registry(doc: AgentMapFile, where: Path) -> SourceRegistry | None:
    """The map's source registry; a missing one is logged (citations are then listed
    unresolved), never a reason not to serve."""
    if not doc.sources:
        return None
    path = Path(doc.sources)
    path = path if path.is_absolute() else where.parent / path
    if not path.exists():
        log.error(
            "agent map %s: source registry %s does not exist; citations stay unresolved. Build it, "
            "e.g. `loom sources build-squad %s --data ../shared/data/squad_qa/dev.jsonl`",
            where,
            path,
            path,
        )
        return None
    return SourceRegistry.open(path)


def citation_hook(doc: AgentMapFile, where: Path, registry: SourceRegistry | None = None) -> CitationHook:
    registry = registry or open_registry(doc, where)

    def cite(agent: Any, raw: str) -> Cited:
        found = unique_citations(parse_citations(raw))
        if not found:
            return Cited()
        if registry is None:  # no registry: the ids as cited, none known
            resolved = [ResolvedCitation(c, None) for c in found]
            return Cited(render_list(resolved), render_markdown(raw, resolved))
        answer = registry.cite(raw, agent.name)  # resolves, records unknown ids, renders
        return Cited(answer.sources, answer.markdown)

    return cite
