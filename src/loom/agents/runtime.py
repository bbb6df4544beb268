"""Running agents: the whole batch goes through each step of the chain together (one engine
burst per step, continuous batching), and only the payloads a step could not answer well move on
to the next step: disabled adapter, load failure, timeout, output that fails its schema after
one repair attempt, or a low-confidence answer."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loom.agents.agent import Agent
from loom.agents.backends import ModelBackend, ModelJob
from loom.agents.citations import strip_citations
from loom.agents.cite import CitationHook, Cited
from loom.agents.result import AgentFailed, AgentResult, Answered, Generated
from loom.agents.spec import FallbackStep
from loom.agents.tools import endpoint_call, python_call, run_calls
from loom.engine import SamplingParams
from loom.errors import LoomError

log = logging.getLogger("loom.agents")
MAX_BATCH = 256  # payloads per run_many call (HTTP batches are capped by the server too)


@dataclass
class _Item:
    index: int
    payload: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    low: AgentResult | None = None  # the first low-confidence answer, kept in case nothing beats it


def disabled(agent: str) -> str | None:
    """The switch that disables ``agent``'s adapter, if set: ``<AGENT>_DISABLE_ADAPTER=1`` or the
    legacy ``<AGENT>_DISABLE_MISTRAL=1`` (AGENT: the name upper-cased, other characters as ``_``)."""
    prefix = re.sub(r"[^A-Za-z0-9]", "_", agent).upper()
    for suffix in ("DISABLE_ADAPTER", "DISABLE_MISTRAL"):
        if os.environ.get(f"{prefix}_{suffix}", "").lower() in ("1", "true", "yes"):
            return f"{prefix}_{suffix}"
    return None


class AgentRuntime:
    """Runs agents on a backend (Loom's engine in-process); see ``loom.agents.load_agents``."""

    def __init__(
        self,
        backend: ModelBackend | None,
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

    def run_many(
        self, agent: Agent, payloads: list[dict[str, Any]], steps: list[FallbackStep] | None = None
    ) -> list[AgentResult]:
        """``steps`` replaces the agent's chain (evaluation measures one model alone: a fallback
        would credit another model's answers to it)."""
        if len(payloads) > MAX_BATCH:
            raise LoomError(f"inputs: {len(payloads)} payloads; send at most {MAX_BATCH} per batch")
        checked = [
            agent.check_input(p, f"inputs[{i}]" if len(payloads) > 1 else "input")
            for i, p in enumerate(payloads)
        ]
        started = time.monotonic()
        pending = [_Item(i, p) for i, p in enumerate(checked)]
        results: list[AgentResult | None] = [None] * len(payloads)
        for number, step in enumerate(agent.chain() if steps is None else steps):
            if not pending:
                break
            pending = self._step(agent, number, step, pending, results, started)
        for item in pending:  # the chain is spent: the first low-confidence answer, else a failure
            if item.low is not None:
                item.low.fallback.reasons = list(item.reasons)
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
        label = f"step {number} ({step.kind}{' ' + step.ref if step.ref else ''})"
        switch = disabled(agent.name) if number == 0 and step.kind == "adapter" else None
        if switch is not None:
            for item in items:
                item.reasons.append(f"{label}: disabled by {switch}")
            return items
        try:
            target = self._target(step)
            answers = self._answers(agent, target, items)
        except LoomError as exc:  # the step cannot run at all (unknown entry point, no engine)
            for item in items:
                item.reasons.append(f"{label}: {exc}")
            return items
        left = []
        for item, (gen, version) in zip(items, answers, strict=True):
            result = self._judge(agent, _Step(number, step, target, label), item, gen, version, started)
            if result is None or result.confidence["level"] == "low":
                if result is not None and item.low is None:
                    item.low = result
                left.append(item)
            else:
                results[item.index] = result
        return left

    def _target(self, step: FallbackStep) -> FallbackStep:
        """A legacy step is the step AGENT_MODEL_RECOMMENDED.json names for it."""
        if step.legacy is None:
            return step
        target = self.recommended.get(step.legacy)
        if target is None:
            raise LoomError(f"legacy {step.legacy!r} is not in AGENT_MODEL_RECOMMENDED.json; add it there")
        return target.model_copy(update={"timeout_s": step.timeout_s or target.timeout_s})

    def _answers(
        self, agent: Agent, step: FallbackStep, items: list[_Item]
    ) -> list[tuple[Generated, str | None]]:
        timeout = step.timeout_s or agent.entry.timeout_s
        if step.stub is not None:
            text = step.stub if isinstance(step.stub, str) else json.dumps(step.stub)
            return [(Generated(text), None) for _ in items]
        if step.python is not None:
            fn = python_call(step.python)
            calls = [functools.partial(fn, item.payload, agent.name) for item in items]
            return [(g, None) for g in run_calls(calls, timeout, f"python {step.python}")]
        if step.endpoint is not None:
            call = endpoint_call(step.endpoint, step.model or agent.name, step.api_key_env, timeout)
            schema = agent.output_schema if agent.output_type == "json" else None
            msgs = [[{"role": "user", "content": agent.prompt.user_message(i.payload)}] for i in items]
            calls = [functools.partial(call, m, schema) for m in msgs]
            return [(g, None) for g in run_calls(calls, timeout, f"endpoint {step.endpoint}")]
        return self._model_answers(agent, step, items, timeout)

    def _model_answers(
        self, agent: Agent, step: FallbackStep, items: list[_Item], timeout: float
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
        out: list[Generated | None] = [None] * len(items)
        jobs: dict[int, ModelJob] = {}
        for k, item in enumerate(items):  # a payload whose prompt cannot be built fails alone
            try:
                jobs[k] = self._job(agent, prompt.token_ids(engine.tokenizer, item.payload), version)
                if agent.output_type == "text" and agent.entry.output.constrained:
                    jobs[k].regex = prompt.answer_pattern(item.payload)
            except Exception as exc:
                out[k] = Generated("", error=f"the prompt cannot be built: {exc}", error_kind="input")
        for k, g in zip(jobs, self.backend.generate(list(jobs.values()), timeout), strict=True):
            out[k] = g
        repair = [k for k in jobs if _needs_repair(agent, out[k])]
        if repair:  # one repair attempt: greedy, under the schema's grammar, with room to finish
            again = self.backend.generate(
                [self._job(agent, jobs[k].prompt_ids, version, repair=True) for k in repair], timeout
            )
            for k, g in zip(repair, again, strict=True):
                out[k] = g
        return [(g or Generated("", error="not run", error_kind="engine"), version) for g in out]

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

    # ------------------------------------------------------------ judging
    def _judge(
        self, agent: Agent, at: _Step, item: _Item, gen: Generated, version: str | None, started: float
    ) -> AgentResult | None:
        if gen.error is not None:
            item.reasons.append(f"{at.label}: {_reason(gen)}")
            return None
        output, problem = _parse(agent, gen.text)
        if problem is not None:
            model_step = at.target.adapter is not None or at.target.base
            item.reasons.append(
                f"{at.label}: {problem}" + (" (after one repair attempt)" if model_step else "")
            )
            return None
        cited = self.on_citations(agent, gen.text)
        low = _low_confidence(agent, gen.text, cited.sources)
        prior = list(item.reasons)
        if low:
            item.reasons.append(f"{at.label}: low confidence ({'; '.join(low)})")
        return AgentResult(
            agent=agent.name,
            output=output,
            raw=gen.text,
            model_version=self._version(at.target, gen, version),
            latency_s=round(time.monotonic() - started, 4),
            fallback=Answered(at.number, at.step.kind, version if at.step.adapter else at.step.ref, prior),
            citations=cited.sources,
            markdown=cited.markdown,
            confidence={"level": "low" if low else "high", "reasons": low},
            warnings=list(agent.warnings),
            usage={"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens},
        )

    def _version(self, target: FallbackStep, gen: Generated, version: str | None) -> dict[str, str | None]:
        """What answered: this engine's base (+ adapter), another endpoint, or neither."""
        if target.adapter is not None or target.base:
            return {"base": self.backend.base_ref if self.backend else None, "adapter": version}
        if target.endpoint is not None:
            return {"base": None, "adapter": None, "endpoint": target.endpoint, "model": gen.adapter}
        return {"base": None, "adapter": None}

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


@dataclass
class _Step:
    number: int
    step: FallbackStep  # as the chain names it
    target: FallbackStep  # what runs (a legacy step's recommended step)
    label: str


def _reason(gen: Generated) -> str:
    """Why a step gave no answer, as the client may see it: the engine's and the store's own
    text (paths, checksums) goes to the log under an id, not into results."""
    if gen.error_kind in ("engine", "adapter_store"):
        ref = uuid.uuid4().hex[:12]
        log.error("agent step failed [%s]: %s", ref, gen.error)
        what = (
            "the adapter's stored files could not be read"
            if gen.error_kind == "adapter_store"
            else "engine error"
        )
        return f"{gen.error_kind}: {what} (server log id {ref})"
    return f"{gen.error_kind or 'error'}: {gen.error}"


def _needs_repair(agent: Agent, gen: Generated | None) -> bool:
    return gen is not None and gen.error is None and _parse(agent, gen.text)[1] is not None


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
    """Hedges count in text answers only (a JSON field may quote "might be" as content)."""
    reasons = []
    lowered = raw.lower() if agent.output_type == "text" else ""
    hedge = next((h for h in agent.entry.confidence.hedges if h.lower() in lowered), None)
    if hedge is not None:
        reasons.append(f"hedges ({hedge!r})")
    if agent.entry.confidence.citations == "required" and not citations:
        reasons.append("no citation, and this agent requires one")
    return reasons
