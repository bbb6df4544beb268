"""The agent map (``AGENT_MODEL_MAP.json``, YAML accepted): what each agent runs and how.

A file holds either ``{"agents": {NAME: ENTRY, ...}, "sources": PATH, "recommended": PATH}`` or
the agents mapping alone. An entry::

    {"adapter": "intent",                  # store ref; a bare name or alias follows promotions
     "base": "smollm2-135m-instruct",      # optional: must be the served base (fingerprint)
     "variant_preference": ["bf16", "fp32"],
     "input": {JSON schema},               # default: the input template's {fields}
     "output": {"type": "json", "schema": {...}},   # default: inferred from the training data
     "generation": {"temperature": 0, "max_tokens": 64, "stop": [], "repetition_penalty": 1.0},
     "fallback": ["intent@v1", "base", {"python": "mod:fn"}, {"endpoint": "http://host:8000"},
                  {"legacy": "name"}, {"stub": {"intent": "PlayMusic"}}],
     "confidence": {"hedges": ["I'm not sure"], "citations": "required|optional|none"},
     "prompt": {"system": "...", "input_template": "...", "allow_template_mismatch": false},
     "warm": 0, "timeout_s": 60}

Every error names the file, the agent, the field and the fix (pydantic does the checking).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loom.errors import LoomError
from loom.refs import RefError, parse_ref, validate_name

MAP_FILE = "AGENT_MODEL_MAP.json"
RECOMMENDED_FILE = "AGENT_MODEL_RECOMMENDED.json"
# Phrases existing deployments treat as a model hedging; matched case-insensitively.
DEFAULT_HEDGES = [
    "i'm not sure",
    "i am not sure",
    "i don't know",
    "i do not know",
    "might be",
    "cannot be sure",
]
VARIANTS = ("fp32", "bf16", "fp16", "int8", "int4", "nf4")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Generation(_Strict):
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=128, ge=1)
    stop: list[str] = Field(default_factory=list)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)

    @field_validator("temperature")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number >= 0 (0 is greedy)")
        return v


class OutputSpec(_Strict):
    type: Literal["text", "json", "auto"] = "auto"  # auto: json when the training output was JSON
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    constrained: bool = True  # json: decode under the schema's grammar (llguidance)


class Confidence(_Strict):
    hedges: list[str] = Field(default_factory=lambda: list(DEFAULT_HEDGES))
    citations: Literal["required", "optional", "none"] = "none"


class PromptOverride(_Strict):
    """Replaces what the adapter's training summary recorded (reported in every result's warnings)."""

    system: str | None = None
    input_template: str | None = None
    allow_template_mismatch: bool = False  # serve although the chat template changed since training


class FallbackStep(_Strict):
    """One step of a fallback chain; exactly one kind is set."""

    adapter: str | None = None  # another adapter ref (e.g. the previous version)
    base: bool = False  # the base alone, same prompt
    python: str | None = None  # module:function(payload, agent) -> str | dict
    legacy: str | None = None  # a name in AGENT_MODEL_RECOMMENDED.json
    endpoint: str | None = None  # an OpenAI-compatible server (e.g. a remote Loom)
    model: str | None = None  # the endpoint's model name (default: the agent's name)
    api_key_env: str | None = None  # environment variable holding the endpoint's key
    stub: Any = None  # a fixed answer (tests, demos)
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):  # "base" or an adapter ref
            return {"base": True} if v == "base" else {"adapter": v}
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> FallbackStep:
        kinds = [k for k in ("adapter", "python", "legacy", "endpoint") if getattr(self, k)]
        kinds += ["base"] * self.base + (["stub"] if self.stub is not None else [])
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of adapter, base, python, legacy, endpoint, stub "
                f'(got {kinds or "none"}), e.g. "base", "intent@v1" or {{"python": "mod:fn"}}'
            )
        if self.adapter is not None:
            _store_ref(self.adapter, "adapter")
        if self.python is not None and (":" not in self.python or self.python.startswith(":")):
            raise ValueError(f"python {self.python!r}: give an entry point as module:function")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.endpoint!r}: give an http:// or https:// URL")
        return self

    @property
    def kind(self) -> str:
        for k in ("adapter", "python", "legacy", "endpoint"):
            if getattr(self, k):
                return k
        return "base" if self.base else "stub"

    @property
    def ref(self) -> str | None:
        """What the step names: an adapter ref, entry point, legacy name or endpoint URL."""
        return self.adapter or self.python or self.legacy or self.endpoint


class Gates(_Strict):
    """What a candidate version must show on a golden-set eval before ``loom promote`` moves
    ``current`` to it. Rates are fractions in [0, 1]; ``None`` switches a gate off. A gate whose
    metric the eval could not measure (no cited rows, no DYNAMIC rows) is skipped, and says so."""

    accuracy: float | None = Field(default=0.95, ge=0.0, le=1.0)
    schema_validity: float | None = Field(default=None, ge=0.0, le=1.0)
    citation_presence: float | None = Field(default=0.90, ge=0.0, le=1.0)
    refusal_accuracy: float | None = Field(default=0.90, ge=0.0, le=1.0)
    p95_latency_s: float | None = Field(default=1.5, gt=0.0)
    # no metric significantly worse than the promoted version (paired test at this level)
    no_regression: bool = True
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)


class EvalSettings(_Strict):
    """How ``loom eval`` grades this agent when the command line does not say."""

    golden: str | None = None  # the golden set's ref (default: <agent>-golden)
    # exact | contains | f1 | json | auto (json for expected objects, else exact) | module:function
    scorer: str = "auto"


class AgentEntry(_Strict):
    description: str = ""
    base: str | None = None
    adapter: str | None = None
    variant_preference: list[str] = Field(default_factory=list)
    system: str | None = None  # base-only agents' system prompt (an adapter's comes from training)
    input_template: str | None = None  # base-only agents' user message (default: "{text}")
    prompt: PromptOverride | None = None
    input: dict[str, Any] | None = None  # JSON schema of the payload
    output: OutputSpec = Field(default_factory=OutputSpec)
    generation: Generation = Field(default_factory=Generation)
    fallback: list[FallbackStep] = Field(default_factory=list)
    confidence: Confidence = Field(default_factory=Confidence)
    warm: int = Field(default=0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    gates: Gates = Field(default_factory=Gates)  # loom promote's bar (loom.evals.gates)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @field_validator("adapter", "base")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return None if v is None else _store_ref(v, "ref")

    @field_validator("variant_preference")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {list(VARIANTS)}")
        return v

    @model_validator(mode="after")
    def _prompt_source(self) -> AgentEntry:
        """An adapter agent's prompt is the one it was trained with; a ``system`` or
        ``input_template`` beside an adapter (the old map format) is an override, reported in
        every result's warnings."""
        if self.adapter is not None and (self.system is not None or self.input_template is not None):
            given = self.prompt or PromptOverride()
            self.prompt = PromptOverride(
                system=given.system if given.system is not None else self.system,
                input_template=given.input_template or self.input_template,
                allow_template_mismatch=given.allow_template_mismatch,
            )
            self.system = self.input_template = None
        return self


class AgentMapFile(_Strict):
    agents: dict[str, AgentEntry]
    sources: str | None = None  # source registry (JSON or SQLite) for citations
    recommended: str | None = None  # AGENT_MODEL_RECOMMENDED.json (legacy fallbacks)

    @field_validator("agents")
    @classmethod
    def _names(cls, v: dict[str, AgentEntry]) -> dict[str, AgentEntry]:
        for name in v:
            validate_name(name, "agent name")
        return v


def _store_ref(value: str, what: str) -> str:
    try:
        kind = parse_ref(value).kind
    except RefError as exc:
        raise ValueError(str(exc)) from None
    if kind != "store":
        raise ValueError(f"{what} {value!r} must be a store ref (name, name@version or name@alias)")
    return value


def read_document(path: Path, what: str) -> Any:
    """JSON or YAML by suffix (YAML also parses JSON); errors name the file and the fix."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LoomError(f"{what} {path} does not exist; give an existing JSON or YAML file") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise LoomError(f"{what} {path} is not valid {kind}: {exc}") from None


def parse_agent_map(doc: Any, where: str) -> AgentMapFile:
    if isinstance(doc, dict) and "agents" not in doc:
        doc = {"agents": doc}  # the agents mapping alone
    if not isinstance(doc, dict) or not isinstance(doc.get("agents"), dict):
        raise LoomError(f"agent map {where}: expected a JSON object of agent name -> settings")
    for name, entry in list(doc["agents"].items()):
        if entry is None or isinstance(entry, str):  # legacy shorthand: name -> adapter ref
            doc["agents"][name] = {"adapter": entry} if entry else {}
    try:
        return AgentMapFile.model_validate(doc)
    except ValidationError as exc:
        raise LoomError(_describe(exc, where)) from None


def _describe(exc: ValidationError, where: str) -> str:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["agents"] and len(loc) >= 2:
            field = ".".join(loc[2:]) or "(the entry)"
            head = f"agent {loc[1]!r}, field {field}"
        else:
            head = f"field {'.'.join(loc) or '(top level)'}"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or fix its spelling (see `loom agents validate --help`)"
        problems.append(f"{head}: {msg}")
    return f"agent map {where}: " + "; ".join(problems)


def load_map_file(path: Path) -> AgentMapFile:
    return parse_agent_map(read_document(path, "agent map"), str(path))
