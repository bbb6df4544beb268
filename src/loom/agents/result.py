"""What an agent run returns, as plain data (JSON-ready with ``to_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loom.errors import LoomError


@dataclass
class Answered:
    """Which step of the chain answered, and why the steps before it did not."""

    step: int  # 0: the agent's own model; 1...: its fallback chain
    kind: str  # adapter | base | python | legacy | endpoint | stub
    ref: str | None  # the adapter version, entry point, endpoint or legacy name
    reasons: list[str] = field(default_factory=list)  # "step 0 (adapter intent@v2): ..." per skipped step


@dataclass
class AgentResult:
    agent: str
    output: Any  # parsed JSON for json agents, the answer text for text agents
    raw: str
    model_version: dict[str, str | None]  # {"base": name@version, "adapter": name@version or None}
    latency_s: float
    fallback: Answered
    citations: list[dict[str, Any]] = field(default_factory=list)
    markdown: str | None = None  # the raw answer with its citations as markdown links
    confidence: dict[str, Any] = field(default_factory=lambda: {"level": "high", "reasons": []})
    warnings: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    error: str | None = None  # every step failed (run_many keeps going; run raises AgentFailed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AgentFailed(LoomError):
    """Every step of an agent's chain failed; the message lists why, step by step."""

    def __init__(self, result: AgentResult) -> None:
        super().__init__(result.error or "agent failed")
        self.result = result


@dataclass
class Generated:
    """One model answer from a backend (plain data between the runtime and the engine)."""

    text: str
    adapter: str | None = None  # the concrete version that answered
    error: str | None = None
    error_kind: str | None = None  # adapter | adapter_store | timeout | engine | input
    prompt_tokens: int = 0
    completion_tokens: int = 0
