"""Agents run by a Loom server: the same ``run``/``run_many`` and ``AgentResult`` as in-process,
over ``POST /v1/agents/{name}/run`` (a batch goes as one request and is batched there)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from loom.agents.result import AgentFailed, AgentResult, Answered
from loom.errors import LoomError


def result_from_json(data: dict[str, Any]) -> AgentResult:
    fields = {k: v for k, v in data.items() if k in AgentResult.__dataclass_fields__}
    fields["fallback"] = Answered(**data["fallback"])
    return AgentResult(**fields)


class RemoteAgent:
    def __init__(self, http: httpx.Client, name: str, info: dict[str, Any]) -> None:
        self.http, self.name, self._info = http, name, info

    def info(self) -> dict[str, Any]:
        return self._info

    def run(self, payload: dict[str, Any]) -> AgentResult:
        data = self._post({"input": payload})
        result = result_from_json(data)
        return result

    def run_many(self, payloads: list[dict[str, Any]]) -> list[AgentResult]:
        return [result_from_json(d) for d in self._post({"inputs": payloads})["data"]]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self.http.post(f"/v1/agents/{self.name}/run", json=body)
        except httpx.HTTPError as exc:
            raise LoomError(f"agent {self.name!r}: server {self.http.base_url} unreachable ({exc})") from None
        if r.status_code != 200:
            error = _error(r)
            if r.status_code == 502 and error.get("code") == "agent_failed":
                failed = AgentResult(
                    self.name, None, "", {}, 0.0, Answered(-1, "none", None), error=error["message"]
                )
                raise AgentFailed(failed)
            raise LoomError(f"agent {self.name!r}: {r.status_code} {error.get('message', r.text[:200])}")
        data: dict[str, Any] = r.json()
        return data


def _error(r: httpx.Response) -> dict[str, Any]:
    try:
        error = r.json().get("error")
    except ValueError:
        return {}
    return error if isinstance(error, dict) else {}


class RemoteAgents(Mapping[str, RemoteAgent]):
    """``load_agents(url=...)``: the agents a server lists at ``GET /v1/agents``."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        try:
            listed = self.http.get("/v1/agents")
        except httpx.HTTPError as exc:
            raise LoomError(
                f"agents server {url} unreachable ({exc}); is `loom serve --agents` running?"
            ) from None
        if listed.status_code != 200:
            raise LoomError(f"agents server {url}: GET /v1/agents answered {listed.status_code}")
        self.infos = {a["name"]: a for a in listed.json()["data"]}

    def __getitem__(self, name: str) -> RemoteAgent:
        info = self.infos.get(name)
        if info is None:
            raise LoomError(f"no agent {name!r} on {self.http.base_url}; agents: {sorted(self.infos)}")
        return RemoteAgent(self.http, name, info)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def close(self) -> None:
        self.http.close()
