"""The agent map: which adapter (and system prompt) serves each agent name.

agents:
  intent:
    adapter: snips-intent          # a store ref; bare names follow hot-swaps
    system: "Answer with the intent label only."
    warm: 4                        # optional: a pool with this warm size at start
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from loom.errors import LoomError
from loom.refs import parse_ref, validate_name


@dataclass
class AgentSpec:
    name: str
    adapter: str | None  # None: the base alone, with a system prompt
    system: str | None = None
    warm: int = 0


def load_agent_map(path: Path) -> dict[str, AgentSpec]:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LoomError(f"agent map {path} does not exist; give an existing YAML file to --agents") from None
    except yaml.YAMLError as exc:
        raise LoomError(f"agent map {path} is not valid YAML: {exc}") from None
    agents = doc.get("agents") if isinstance(doc, dict) else None
    if not isinstance(agents, dict):
        raise LoomError(f"agent map {path}: expected a top-level 'agents:' mapping of name -> settings")
    out: dict[str, AgentSpec] = {}
    for name, spec in agents.items():
        where = f"agent map {path}, agent {name!r}"
        validate_name(str(name), "agent name")
        spec = spec or {}
        if isinstance(spec, str):
            spec = {"adapter": spec}
        if not isinstance(spec, dict):
            raise LoomError(f"{where}: expected a mapping with 'adapter' and optional 'system', 'warm'")
        unknown = set(spec) - {"adapter", "system", "warm"}
        if unknown:
            raise LoomError(f"{where}: unknown keys {sorted(unknown)}; allowed: adapter, system, warm")
        adapter = spec.get("adapter")
        if adapter is not None and parse_ref(str(adapter)).kind != "store":
            raise LoomError(f"{where}: adapter {adapter!r} must be a store ref (name or name@version)")
        warm = spec.get("warm", 0)
        if not isinstance(warm, int) or warm < 0:
            raise LoomError(f"{where}: warm must be a whole number >= 0, got {warm!r}")
        out[str(name)] = AgentSpec(str(name), adapter and str(adapter), spec.get("system"), warm)
    return out
