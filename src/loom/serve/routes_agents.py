"""Agent routes: ``GET /v1/agents``, ``GET /v1/agents/{name}``, ``POST /v1/agents/{name}/run``.

A run takes ``{"input": {...}}`` (one payload) or ``{"inputs": [...]}`` (a batch that goes through
the engine together). Every payload is checked against the agent's input schema before anything
runs (a bad one is a 400 naming it); a batch answers every payload, a payload whose whole chain
failed carrying its ``error``.

Each result has its own ``response_id`` (feedback names it) beside its ``model_version``; the
``X-Loom-Response-Id`` and ``X-Loom-Model-Version`` headers carry the one result's, or for a
batch the comma-separated list of every result's in input order."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from loom.agents.agent import Agent
from loom.agents.result import AgentResult
from loom.errors import LoomError
from loom.serve.agents import ServedAgents
from loom.serve.auth import require_key
from loom.serve.errors import APIError
from loom.serve.requestlog import new_response_id
from loom.serve.schemas import AgentRunRequest
from loom.serve.service import Service, service_of
from loom.serve.stamp import Stamp, request_log_of, route_of

router = APIRouter()


def _served(request: Request) -> tuple[Service, ServedAgents]:
    service = service_of(request)
    service.ready()
    return service, service.agents


def _agent(served: ServedAgents, name: str) -> Agent:
    agent = served.agents.get(name)
    if agent is not None:
        return agent
    if name in served.errors:
        raise APIError(
            503,
            f"agent {name!r} is not available: {served.errors[name]}",
            "service_unavailable",
            "agent_unavailable",
            "name",
        )
    raise APIError(
        404,
        f"no agent {name!r}; see GET /v1/agents (agents: {sorted(served.agents) or 'none'})",
        "not_found_error",
        "agent_not_found",
        "name",
    )


@router.get("/v1/agents", dependencies=[Depends(require_key)])
async def list_agents(request: Request) -> dict[str, Any]:
    service, served = _served(request)
    return {"object": "list", "data": served.describe(service.engine)}


@router.get("/v1/agents/{name}", dependencies=[Depends(require_key)])
async def show_agent(name: str, request: Request) -> dict[str, Any]:
    service, served = _served(request)
    agent = _agent(served, name)
    return next(a for a in served.describe(service.engine) if a["name"] == agent.name)


@router.post("/v1/agents/{name}/run", dependencies=[Depends(require_key)])
async def run_agent(name: str, body: AgentRunRequest, request: Request, response: Response) -> dict[str, Any]:
    service, served = _served(request)
    agent = _agent(served, name)
    if (body.input is None) == (body.inputs is None):
        raise APIError(
            400, "give either input (one payload) or inputs (a list), not both or neither", param="input"
        )
    payloads = [body.input] if body.input is not None else list(body.inputs or [])
    request.state.model = name
    runtime = served.runtime
    assert runtime is not None
    try:
        for i, payload in enumerate(payloads):  # all checked before any runs
            agent.check_input(payload, "input" if body.input is not None else f"inputs[{i}]")
    except LoomError as exc:
        raise APIError(400, str(exc), param="input" if body.input is not None else "inputs") from None
    if len(payloads) > service.capacity:
        raise APIError(
            400,
            f"inputs: {len(payloads)} payloads exceed what this server admits at once ({service.capacity}); "
            "split the batch",
            param="inputs",
        )
    admission = service.admit(len(payloads))
    try:  # a worker thread of the agents' own pool: a long batch never starves the loop's executor
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(served.pool, runtime.run_many, agent, payloads)
    finally:
        admission.release()
    stamps = [_stamp(request, r, p) for r, p in zip(results, payloads, strict=True)]
    for result, stamp in zip(results, stamps, strict=True):
        _observe(service, result)
        ok = result.error is None
        stamp.done(result.raw if ok else None, "ok" if ok else "error", latency_s=result.latency_s)
    headers = {k: ",".join(s.headers()[k] for s in stamps) for k in stamps[0].headers()}
    response.headers.update(headers)
    if body.input is not None:
        result = results[0]
        if result.error is not None:
            raise APIError(502, result.error, "server_error", "agent_failed", headers=headers)
        return _body(result, stamps[0])
    return {"object": "list", "data": [_body(r, s) for r, s in zip(results, stamps, strict=True)]}


def _stamp(request: Request, result: AgentResult, payload: dict[str, Any]) -> Stamp:
    mv = result.model_version
    step = result.fallback
    return Stamp(
        new_response_id("agent"),
        {"base": mv.get("base"), "adapter": mv.get("adapter")},
        route_of(request),
        result.agent,
        payload,
        request_log_of(request),
        answered_by=f"{step.kind}:{step.ref}" if step.ref else step.kind,
    )


def _body(result: AgentResult, stamp: Stamp) -> dict[str, Any]:
    out = {"response_id": stamp.response_id, **result.to_dict()}
    if out["error"] is None:
        del out["error"]
    return out


def _observe(service: Service, result: AgentResult) -> None:
    m = service.metrics
    kind = result.fallback.kind
    m.agent_runs.labels(result.agent, kind, result.confidence["level"]).inc()
    if result.fallback.step > 0:
        m.agent_fallbacks.labels(result.agent).inc()
