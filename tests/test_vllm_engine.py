"""``VLLMEngine``'s failure paths against a small real HTTP server that answers as vLLM does
when things go wrong (a mid-stream error event, a stream cut without a finish, a refused
adapter), and against a closed port (vLLM dead). The happy paths run against the real vLLM in
tests/test_vllm_backend.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.engine import EngineConfig
from loom.engine.types import Completion, SamplingParams
from loom.serve import ServeConfig
from loom.serve.errors import APIError
from loom.serve.registry import Target
from loom.serve.server import free_port, serve_in_thread
from loom.serve.service import Job, Service
from loom.testing import make_tokenizer
from loom.vllm.engine import VLLMEngine
from loom.vllm.launch import VLLMLaunch
from loom.vllm.supervisor import Supervisor


def fake_vllm(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.append({"auth": request.headers.get("authorization"), **body})
        first = {"choices": [{"text": "Hi", "token_ids": [7], "finish_reason": None}]}
        if body["prompt"][0] == 1:  # vLLM fails a running stream with an error event
            events = [first, {"error": {"message": "engine core died", "code": 500}}]
        elif body["prompt"][0] == 2:  # the stream ends without a finish reason
            events = [first]
        else:
            events = [first, {"choices": [{"text": "!", "token_ids": [8], "finish_reason": "stop"}]}]
        lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
        return StreamingResponse(iter(lines), media_type="text/event-stream")

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Any:
        return JSONResponse({"error": {"message": "rank 512 > max_lora_rank", "code": 400}}, status_code=400)

    return app


def engine_at(port: int, tmp: Path) -> VLLMEngine:
    launch = VLLMLaunch(
        python="python", model_dir=tmp, served_name="b@v1", port=port, dtype="float32", max_model_len=128,
        max_num_seqs=4, max_loras=1, max_lora_rank=8, max_cpu_loras=1, kv_cache_gib=1,
    )  # fmt: skip
    sup = Supervisor(launch, tmp / "vllm.log")
    return VLLMEngine(
        sup,
        make_tokenizer(),
        EngineConfig(max_seq_len=128),
        store=None,
        base_ref="b@v1",
        base_fingerprint=None,
    )


def run(engine: VLLMEngine, ids: list[int]) -> Completion:
    async def collect() -> Completion:
        async for chunk in engine.stream(ids, params=SamplingParams(max_new_tokens=4)):
            if chunk.finished and chunk.completion is not None:
                return chunk.completion
        raise AssertionError("no completion")

    return asyncio.run(collect())


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[VLLMEngine, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    port = free_port()
    with serve_in_thread(fake_vllm(seen), port=port, healthy=False):
        yield engine_at(port, tmp_path), seen


def test_stream_outcomes_and_auth(fake: tuple[VLLMEngine, list[dict[str, Any]]]) -> None:
    engine, seen = fake
    ok = run(engine, [5, 6])
    assert (ok.text, ok.token_ids, ok.finish_reason) == ("Hi!", [7, 8], "stop")
    assert seen[-1]["auth"] == engine.supervisor.auth["Authorization"]  # vLLM's own key, never open
    failed = run(engine, [1, 6])  # an error event mid-stream is an error, not a short success
    assert (
        failed.finish_reason == "error"
        and failed.error_kind == "engine"
        and "engine core died" in str(failed.error)
    )
    cut = run(engine, [2, 6])
    assert cut.finish_reason == "error" and "without a finish" in str(cut.error)


def test_a_refused_adapter_fails_its_request_only(
    fake: tuple[VLLMEngine, list[dict[str, Any]]], tiny_adapter_dir: Path
) -> None:
    engine, _ = fake
    done = run_adapter(engine, f"path:{tiny_adapter_dir}")
    assert (
        done.finish_reason == "error" and done.error_kind == "adapter" and "max_lora_rank" in str(done.error)
    )
    assert not engine.in_flight  # nothing left held
    assert run(engine, [5]).finish_reason == "stop"


def run_adapter(engine: VLLMEngine, adapter: str) -> Completion:
    async def collect() -> Completion:
        async for chunk in engine.stream([5], adapter=adapter, params=SamplingParams(max_new_tokens=4)):
            if chunk.completion is not None:
                return chunk.completion
        raise AssertionError("no completion")

    return asyncio.run(collect())


def test_a_dead_vllm_is_a_503_to_the_client(tmp_path: Path) -> None:
    engine = engine_at(free_port(), tmp_path)  # nothing listens there
    done = run(engine, [5, 6])
    assert done.error_kind == "backend_unavailable"
    service = Service(ServeConfig())
    with pytest.raises(APIError) as err:
        service.checked(done, Job([5, 6], Target(model="b", adapter=None), SamplingParams()))
    assert err.value.status == 503 and err.value.code == "restarting"
    assert err.value.headers == {"Retry-After": "5"}
