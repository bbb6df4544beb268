"""Running agents: the whole batch goes through each step of the chain together (one engine
burst per step, continuous batching), and only the payloads a step could not answer well move on
to the next step: disabled adapter, load failure, timeout, output that fails its schema after
one repair attempt, or a low-confidence answer."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.agents.agent import Agent
from loom.agents.backends import EngineBackend, ModelJob, endpoint_step, python_step
from loom.agents.citations import strip_citations
from loom.agents.cite import CitationHook, Cited
from loom.agents.result import AgentFailed, AgentResult, Answered, Generated
from loom.agents.spec import FallbackStep
from loom.engine import SamplingParams
from loom.errors import LoomError

MAX_BATCH = 256  # payloads per run_many call (HTTP batches are capped by the server too)


@dataclass
class _Item:
    index: int
    payload: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    low: AgentResult | None = None  # the first low-confidence answer, kept in case nothing beats it


def disabled(agent: str) -> bool:
    """``<AGENT>_DISABLE_ADAPTER=1`` (or the legacy ``<AGENT>_DISABLE_MISTRAL=1``)."""
    prefix = re.sub(r"[^A-Za-z0-9]", "_", agent).upper()
    return any(
        os.environ.get(f"{prefix}_{s}", "") in ("1", "true", "yes")
        for s in ("DISABLE_ADAPTER", "DISABLE_MISTRAL")
    )


class AgentRuntime:
    """Runs agents on a backend (Loom's engine in-process); see ``loom.agents.load_agents``."""

    def __init__(
        self,
        backend: EngineBackend | None,
        recommended: dict[str, FallbackStep] | None = None,
        on_citations: CitationHook | None = None,
    ) -> None:
        self.backend = backend
        self.recommended = recommended or {}
        self.on_citations: CitationHook = on_citations or (lambda _a, _raw: Cited())

    def run(self, agent: Agent, payload: dict[str, Any]) -> AgentResult:
        result = self.run_many(agent, [payload])[0]
        if result.error is not None:
            raise AgentFailed(result)
        return result

    def run_many(self, agent: Agent, payloads: list[dict[str, Any]]) -> list[AgentResult]:
        if len(payloads) > MAX_BATCH:
            raise LoomError(f"inputs: {len(payloads)} payloads; send at most {MAX_BATCH} per batch")
        checked = [
            agent.check_input(p, f"inputs[{i}]" if len(payloads) > 1 else "input")
            for i, p in enumerate(payloads)
        ]
        started = time.monotonic()
        pending = [_Item(i, p) for i, p in enumerate(checked)]
        results: list[AgentResult | None] = [None] * len(payloads)
        for number, step in enumerate(agent.chain()):
            if not pending:
                break
            pending = self._step(agent, number, step, pending, results, started)
        for item in pending:  # the chain is spent
            results[item.index] = item.low or self._failure(agent, item, started)
        return [r for r in results if r is not None]

    # ------------------------------------------------------------ one step
    def _step(
        self,
        agent: Agent,
        number: int,
        step: FallbackStep,
        items: list[_Item],
        results: list[AgentResult | None],
        started: float,
    ) -> list[_Item]:
        ref = _ref(step)
        label = f"step {number} ({step.kind}{' ' + ref if ref else ''})"
        if number == 0 and step.kind == "adapter" and disabled(agent.name):
            for item in items:
                item.reasons.append(f"{label}: disabled by {agent.name.upper()}_DISABLE_ADAPTER")
            return items
        try:
            answers = self._answers(agent, step, items)
        except LoomError as exc:  # the step cannot run at all (unknown entry point, no engine)
            for item in items:
                item.reasons.append(f"{label}: {exc}")
            return items
        left = []
        for item, (gen, version) in zip(items, answers, strict=True):
            result = self._judge(agent, number, step, item, gen, version, started, label)
            if result is None or result.confidence["level"] == "low":
                if result is not None and item.low is None:
                    item.low = result
                left.append(item)
            else:
                results[item.index] = result
        return left

    def _answers(
        self, agent: Agent, step: FallbackStep, items: list[_Item]
    ) -> list[tuple[Generated, str | None]]:
        kind = step.kind
        if kind == "legacy":
            assert step.legacy is not None
            target = self.recommended.get(step.legacy)
            if target is None:
                raise LoomError(f"legacy {step.legacy!r} is not in AGENT_MODEL_RECOMMENDED.json")
            return self._answers(agent, target, items)
        if kind == "stub":
            text = step.stub if isinstance(step.stub, str) else json.dumps(step.stub)
            return [(Generated(text), None) for _ in items]
        if kind == "python":
            assert step.python is not None
            fn = python_step(step.python)
            return [(_guarded(fn, item.payload, agent.name), None) for item in items]
        if kind == "endpoint":
            assert step.endpoint is not None
            call = endpoint_step(
                step.endpoint,
                step.model or agent.name,
                step.api_key_env,
                step.timeout_s or agent.entry.timeout_s,
            )
            schema = agent.output_schema if agent.output_type == "json" else None
            return [
                (call([{"role": "user", "content": agent.prompt.user_message(i.payload)}], schema), None)
                for i in items
            ]
        return self._model_answers(agent, step, items)

    def _model_answers(
        self, agent: Agent, step: FallbackStep, items: list[_Item]
    ) -> list[tuple[Generated, str | None]]:
        if self.backend is None:
            raise LoomError("no engine: this runtime answers with its non-model fallbacks only")
        engine = self.backend.engine
        version = None
        if step.adapter is not None:
            try:
                version = engine.resolve_adapter(step.adapter).key
            except LoomError as exc:
                return [(Generated("", error=str(exc), error_kind="adapter"), None) for _ in items]
        prompt = agent.prompt_for(version)
        jobs = [self._job(agent, prompt.token_ids(engine.tokenizer, i.payload), version) for i in items]
        timeout = step.timeout_s or agent.entry.timeout_s
        out = self.backend.generate(jobs, timeout)
        repair = [k for k, g in enumerate(out) if g.error is None and self._invalid(agent, g.text)]
        if repair:  # one repair attempt: greedy, under the schema's grammar, with room to finish
            again = self.backend.generate(
                [self._job(agent, jobs[k].prompt_ids, version, repair=True) for k in repair], timeout
            )
            for k, g in zip(repair, again, strict=True):
                out[k] = g
        return [(g, version) for g in out]

    def _job(self, agent: Agent, ids: list[int], version: str | None, repair: bool = False) -> ModelJob:
        gen = agent.entry.generation
        params = SamplingParams(
            max_new_tokens=gen.max_tokens * (2 if repair else 1),
            temperature=0.0 if repair else gen.temperature,
            repetition_penalty=gen.repetition_penalty,
            stop=list(gen.stop),
        )
        json_out = agent.output_type == "json" and (agent.entry.output.constrained or repair)
        return ModelJob(
            ids,
            version,
            params,
            agent.output_schema if json_out else None,
            json_out and not agent.output_schema,
        )

    def _invalid(self, agent: Agent, raw: str) -> bool:
        return _parse(agent, raw)[1] is not None

    # ------------------------------------------------------------ judging
    def _judge(
        self,
        agent: Agent,
        number: int,
        step: FallbackStep,
        item: _Item,
        gen: Generated,
        version: str | None,
        started: float,
        label: str,
    ) -> AgentResult | None:
        if gen.error is not None:
            item.reasons.append(f"{label}: {gen.error_kind or 'error'}: {gen.error}")
            return None
        output, problem = _parse(agent, gen.text)
        if problem is not None:
            item.reasons.append(
                f"{label}: {problem} (after one repair attempt)"
                if step.kind in ("adapter", "base")
                else f"{label}: {problem}"
            )
            return None
        cited = self.on_citations(agent, gen.text)
        low = _low_confidence(agent, gen.text, cited.sources)
        model_version: dict[str, str | None] = {"base": None, "adapter": None}
        if step.kind in ("adapter", "base"):
            model_version = {"base": self.backend.base_ref if self.backend else None, "adapter": version}
        elif step.kind == "endpoint":
            model_version = {"base": None, "adapter": None, "endpoint": step.endpoint, "model": gen.adapter}
        ref = version if step.kind == "adapter" else _ref(step)
        prior = list(item.reasons)
        if low:
            item.reasons.append(f"{label}: low confidence ({'; '.join(low)})")
        return AgentResult(
            agent=agent.name,
            output=output,
            raw=gen.text,
            model_version=model_version,
            latency_s=round(time.monotonic() - started, 4),
            fallback=Answered(number, step.kind, ref, prior),
            citations=cited.sources,
            markdown=cited.markdown,
            confidence={"level": "low" if low else "high", "reasons": low},
            warnings=list(agent.warnings),
            usage={"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens},
        )

    def _failure(self, agent: Agent, item: _Item, started: float) -> AgentResult:
        return AgentResult(
            agent=agent.name,
            output=None,
            raw="",
            model_version={"base": None, "adapter": None},
            latency_s=round(time.monotonic() - started, 4),
            fallback=Answered(-1, "none", None, item.reasons),
            warnings=list(agent.warnings),
            error=f"agent {agent.name!r}: every step failed: " + "; ".join(item.reasons),
        )


def _parse(agent: Agent, raw: str) -> tuple[Any, str | None]:
    if agent.output_type != "json":  # the answer without its markers (``citations`` lists them)
        return strip_citations(raw).strip(), None
    try:
        value = json.loads(raw)
    except ValueError:
        return None, "output is not valid JSON"
    problem = agent.output_problem(value)
    return value, problem


def _low_confidence(agent: Agent, raw: str, citations: list[dict[str, Any]]) -> list[str]:
    reasons = []
    lowered = raw.lower()
    hedge = next((h for h in agent.entry.confidence.hedges if h.lower() in lowered), None)
    if hedge is not None:
        reasons.append(f"hedges ({hedge!r})")
    if agent.entry.confidence.citations == "required" and not citations:
        reasons.append("no citation, and this agent requires one")
    return reasons


def _guarded(
    fn: Callable[[dict[str, Any], str], Generated], payload: dict[str, Any], agent: str
) -> Generated:
    try:
        return fn(payload, agent)
    except Exception as exc:  # a user's fallback function must not fail the other payloads
        return Generated("", error=f"{type(exc).__name__}: {exc}", error_kind="python")


def _ref(step: FallbackStep) -> str | None:
    return step.adapter or step.python or step.legacy or step.endpoint
