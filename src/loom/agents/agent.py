"""An agent from the map, checked against the store and the served base: its prompt (from its
adapter's training), its input and output schemas, and its fallback chain."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from loom.agents.prompting import AgentPrompt, agent_prompt
from loom.agents.schemas import check_schema, first_error, input_schema, output_schema
from loom.agents.spec import AgentEntry, FallbackStep
from loom.errors import CompatibilityError, LoomError
from loom.store.manifest import BaseInfo, Manifest
from loom.store.store import Store


@dataclass
class BaseFacts:
    """The served base, as agents need it."""

    ref: str | None
    info: BaseInfo | None
    variant: str = "fp32"  # the dtype the engine runs (fp32, bf16, fp16)
    device: str = "cpu"

    @property
    def template_sha(self) -> str | None:
        return self.info.chat_template_sha256 if self.info else None


@dataclass
class Agent:
    name: str
    entry: AgentEntry
    prompt: AgentPrompt  # of the version current when the map was loaded (and of the base step)
    input_schema: dict[str, Any]
    output_type: str  # text | json
    output_schema: dict[str, Any] | None
    variant: str | None = None
    warnings: list[str] = field(default_factory=list)
    store: Store | None = None
    base: BaseFacts | None = None
    _prompts: dict[str, AgentPrompt] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # the serve registry's view (an agent is also a chat `model`)
    @property
    def adapter(self) -> str | None:
        return self.entry.adapter

    @adapter.setter
    def adapter(self, ref: str | None) -> None:  # a pool swap pins the agent to its new version
        self.entry.adapter = ref

    @property
    def system(self) -> str | None:
        return self.prompt.system

    @property
    def warm(self) -> int:
        return self.entry.warm

    def chain(self) -> list[FallbackStep]:
        own = FallbackStep(adapter=self.entry.adapter) if self.entry.adapter else FallbackStep(base=True)
        return [own, *self.entry.fallback]

    def check_input(self, payload: Any, where: str = "input") -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise LoomError(f"{where}: expected a JSON object with fields {self.prompt.fields}")
        problem = first_error(self._input_validator, payload, where)
        if problem is not None:
            raise LoomError(f"agent {self.name!r}: {problem}")
        return payload

    def output_problem(self, value: Any) -> str | None:
        return (
            None if self._output_validator is None else first_error(self._output_validator, value, "output")
        )

    def cached_prompt(self, version: str | None) -> AgentPrompt | None:
        """:meth:`prompt_for` when it needs no store read, else None."""
        if version is None or self.store is None or version.startswith("path:"):
            return self.prompt
        with self._lock:
            return self._prompts.get(version)

    def prompt_for(self, version: str | None) -> AgentPrompt:
        """The training prompt of adapter ``version`` (name@version; immutable, so read once)."""
        known = self.cached_prompt(version)
        if known is None:
            assert version is not None and self.store is not None
            manifest = self.store.resolve(version).manifest
            known = agent_prompt(self.name, self.entry, manifest.training_summary, self._template_sha())
            with self._lock:
                self._prompts[version] = known
        return known

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.entry.description,
            "adapter": self.entry.adapter,
            "prompt_source": self.prompt.source,
            "system_prompt": self.prompt.system,
            "input_template": self.prompt.input_template,
            "input_schema": self.input_schema,
            "output": {"type": self.output_type, "schema": self.output_schema},
            "fallback": [s.kind + (f" {s.ref}" if s.ref else "") for s in self.entry.fallback],
            "variant": self.variant,
            "warnings": self.warnings,
        }

    def _template_sha(self) -> str | None:
        return self.base.template_sha if self.base else None

    def __post_init__(self) -> None:
        self._input_validator: Draft202012Validator = check_schema(
            self.input_schema, f"agent {self.name!r} input"
        )
        self._output_validator: Draft202012Validator | None = (
            check_schema(self.output_schema, f"agent {self.name!r} output") if self.output_schema else None
        )


def build_agent(name: str, entry: AgentEntry, store: Store | None, base: BaseFacts) -> Agent:
    """Check ``entry`` against the store and the served base; infer what the map leaves out."""
    manifest = _adapter_manifest(name, entry, store, base) if entry.adapter else None
    summary = manifest.training_summary if manifest else None
    prompt = agent_prompt(name, entry, summary, base.template_sha)
    warnings = list(prompt.warnings)
    schema_in = entry.input or input_schema(prompt.fields)
    labels, label_field = _snapshot_labels(store, summary)
    inferred = output_schema(prompt.output_template, label_field, labels)
    kind = entry.output.type
    if kind == "auto":
        kind = "json" if (entry.output.json_schema or inferred) else "text"
    schema_out = entry.output.json_schema or (inferred if kind == "json" else None)
    variant, note = pick_variant(entry.variant_preference, base)
    if note:
        warnings.append(note)
    agent = Agent(name, entry, prompt, schema_in, kind, schema_out, variant, warnings, store, base)
    if manifest is not None:
        agent._prompts[f"{manifest.name}@{manifest.version}"] = prompt
    return agent


def _adapter_manifest(name: str, entry: AgentEntry, store: Store | None, base: BaseFacts) -> Manifest:
    if store is None:
        raise LoomError(f"agent {name!r}: adapter {entry.adapter} needs a model store; none is configured")
    assert entry.adapter is not None
    manifest = store.resolve(entry.adapter).manifest
    if manifest.adapter is None:
        raise LoomError(f"agent {name!r}: {entry.adapter} is a {manifest.kind}, not an adapter")
    if entry.base is not None:
        wanted = store.resolve(entry.base).manifest.base
        if base.info is not None and (wanted is None or wanted.fingerprint != base.info.fingerprint):
            raise CompatibilityError(
                f"agent {name!r}: base {entry.base} is not the served base {base.ref}; serve that base "
                "or change the agent's base in the map"
            )
    return manifest


def _snapshot_labels(store: Store | None, summary: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """The labels the training snapshot counted (for an enum), if it counted any."""
    snapshot = ((summary or {}).get("data") or {}).get("snapshot")
    if store is None or not snapshot:
        return [], None
    try:
        facts = store.resolve(snapshot).manifest.dataset or {}
    except LoomError:
        return [], None  # the snapshot was retired: no enum, the schema stays a string
    return sorted((facts.get("rows_per_label") or {}).keys()), facts.get("label_field")


def pick_variant(preference: list[str], base: BaseFacts) -> tuple[str | None, str | None]:
    """The first preferred variant this device and the base's manifest offer, and a note when
    the engine serves another one (one base is served in one variant for every agent)."""
    if not preference:
        return base.variant, None
    offered = {"fp32", "bf16"} | ({"fp16"} if base.device.startswith("cuda") else set())
    offered |= set(base.info.quantized_variants if base.info else [])
    picked = next((v for v in preference if v in offered), None)
    if picked is None:
        return base.variant, f"none of variant_preference {preference} is offered here; served {base.variant}"
    if picked != base.variant:
        return base.variant, f"variant_preference picks {picked}, but the engine serves {base.variant}"
    return picked, None
