"""The HTTP server on the tiny random Mistral, over real HTTP (uvicorn on loopback), spoken to
with the official ``openai`` client where it applies: every route, error shapes, auth, limits,
429, cancellation on disconnect, hot-swap under load, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loom.engine import Engine
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store

MSG = [{"role": "user", "content": "play some music"}]


@pytest.fixture(scope="module")
def engine(engine_store: Store) -> Iterator[Engine]:
    eng = Engine.from_store(
        "tiny",
        device="cpu",
        store=engine_store,
        max_batch_size=4,
        max_seq_len=256,
        kv_cache_mb=8,
        max_adapters=4,
        max_rank=8,
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def agents_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agents") / "agents.yaml"
    path.write_text("agents:\n  bot:\n    adapter: all8\n    system: You are terse.\n")
    return path


@pytest.fixture(scope="module")
def url(engine: Engine, agents_file: Path) -> Iterator[str]:
    cfg = ServeConfig(agents_file=agents_file, max_queue=4, max_prompt_tokens=200, max_body_bytes=20_000)
    with serve_in_thread(create_app(cfg, engine=engine)) as served:
        yield served


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats()["batch_size"] or engine.stats()["queue_depth"]:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


# ----------------------------------------------------------------- OpenAI routes
def test_models_list_base_adapters_and_agents(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny", "qv4", "all8", "o2", "bot"} <= set(models)
    assert models["qv4"].parent == "tiny" and models["tiny"].parent is None
    assert models["qv4"].root == "qv4@v1"  # the current alias
    assert "foreign" not in models  # built for another base: not servable here


def test_chat_completion_base_adapter_and_agent(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0)
    qv4 = client.chat.completions.create(model="qv4", messages=MSG, max_tokens=6, temperature=0)
    pinned = client.chat.completions.create(model="qv4@v2", messages=MSG, max_tokens=6, temperature=0)
    agent = client.chat.completions.create(model="bot", messages=MSG, max_tokens=6, temperature=0)
    assert base.system_fingerprint == "tiny@v1" and qv4.system_fingerprint == "qv4@v1"
    assert pinned.system_fingerprint == "qv4@v2" and agent.system_fingerprint == "all8@v1"
    assert base.choices[0].message.content != qv4.choices[0].message.content  # the adapter matters
    assert base.usage is not None and base.usage.completion_tokens == 6
    assert base.usage.total_tokens == base.usage.prompt_tokens + 6
    assert base.choices[0].finish_reason == "length" and base.model == "tiny"


def test_stream_matches_the_blocking_answer_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="qv4", messages=MSG, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="qv4",
            messages=MSG,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_n_seed_stop_and_sampling(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=7)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # choices differ from each other
    assert a.usage is not None and a.usage.completion_tokens == 24
    one = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
    assert one.usage is not None and a.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    greedy = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    text = greedy.choices[0].message.content or ""
    stop = text[3:5]
    cut = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0, stop=[stop])
    assert (
        cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    )


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"intent": {"enum": ["PlayMusic", "GetWeather"]}},
        "required": ["intent"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model="qv4",
        messages=MSG,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "intent", "schema": schema}},
    )
    assert json.loads(out.choices[0].message.content or "")["intent"] in {"PlayMusic", "GetWeather"}


def test_text_completions_with_several_prompts_echo_and_stream(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="o2", prompt=["the quick", "play some"], max_tokens=5, temperature=0
    )
    assert len(out.choices) == 2 and out.system_fingerprint == "o2@v1"
    echo = client.completions.create(model="o2", prompt="the quick", max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == "the quick" + out.choices[0].text
    streamed = client.completions.create(
        model="o2", prompt="the quick", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_openai_error_shapes(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-adapter", messages=MSG, max_tokens=2)
    assert missing.value.code == "model_not_found" and "no-such-adapter" in str(missing.value)
    for model in ("../../etc/passwd", "/tmp/adapter", "hf:org/model"):
        with pytest.raises(openai.BadRequestError) as escape:
            client.chat.completions.create(model=model, messages=MSG, max_tokens=2)
        assert escape.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, temperature=5)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="tiny", messages=MSG, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert "unsupported parameter 'tools'" in str(unknown.value)
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fox " * 400}])
    assert long_prompt.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10_000)
    assert too_many.value.code == "context_length_exceeded" and "max_tokens" in str(too_many.value)
    with pytest.raises(openai.BadRequestError) as bad_ids:  # would fail the whole batch in the engine
        client.completions.create(model="tiny", prompt=[1, 2, 99_999], max_tokens=2)
    assert "outside the vocabulary" in str(bad_ids.value)
    with pytest.raises(openai.BadRequestError) as stops:
        client.chat.completions.create(model="tiny", messages=MSG, stop=["a", "b", "c", "d", "e"])
    assert stops.value.body["param"] == "stop"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_wide:  # never admissible: 400, not a 429 loop
        client.chat.completions.create(model="tiny", messages=MSG, n=9, max_tokens=2)
    assert too_wide.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=" tiny", messages=MSG, max_tokens=2)
    big = httpx.post(
        f"{url}/v1/chat/completions", content=b"x" * 30_000, headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    body = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert body.status_code == 400 and set(body.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------- native routes
def test_generate_route(url: str) -> None:
    r = httpx.post(f"{url}/generate", json={"prompt": "play some", "max_tokens": 4, "adapter": "qv4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "qv4@v1" and body["usage"]["completion_tokens"] == 4
    agent = httpx.post(f"{url}/generate", json={"prompt": "play", "max_tokens": 2, "agent": "bot"}).json()
    assert agent["model_version"] == "all8@v1"
    both = httpx.post(f"{url}/generate", json={"prompt": "x", "agent": "bot", "adapter": "qv4"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "adapter"


def test_chat_sessions_and_conversation_routes(url: str) -> None:
    first = httpx.post(f"{url}/chat", json={"message": "hello", "agent": "bot", "max_tokens": 3}).json()
    session = first["session_id"]
    second = httpx.post(
        f"{url}/chat",
        json={"message": "and then?", "session_id": session, "context": "the fox", "max_tokens": 3},
    ).json()
    assert (
        second["session_id"] == session and second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    )
    history = httpx.get(f"{url}/conversation", params={"session_id": session}).json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "hello" and history[1]["content"] == first["response"]
    with httpx.stream(
        "POST", f"{url}/chat/stream", json={"message": "more", "session_id": session, "max_tokens": 4}
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["done"] and "".join(e.get("delta", "") for e in events[:-1]) == events[-1]["response"]
    assert len(httpx.get(f"{url}/conversation", params={"session_id": session}).json()["messages"]) == 6
    assert httpx.delete(f"{url}/conversation", params={"session_id": session}).json()["deleted"]
    gone = httpx.get(f"{url}/conversation", params={"session_id": session})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"


def test_long_chat_session_drops_its_oldest_turns(url: str) -> None:
    session = None
    words = "play some music by the beatles " * 8  # about 50 tokens a turn
    for _ in range(6):
        body = {"message": words, "max_tokens": 20, "session_id": session}
        r = httpx.post(f"{url}/chat", json={k: v for k, v in body.items() if v is not None})
        assert r.status_code == 200, r.text
        session = r.json()["session_id"]
        assert r.json()["usage"]["prompt_tokens"] <= 200  # the server's prompt limit
    assert len(httpx.get(f"{url}/conversation", params={"session_id": session}).json()["messages"]) == 12


def test_health_and_info(url: str) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{url}/info").json()
    assert info["base"]["ref"] == "tiny@v1" and info["base"]["version"] == "v1"
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["loom_version"]
    assert info["limits"]["max_batch_size"] == 4 and info["limits"]["max_queue"] == 4


def test_metrics_counters_move(client: openai.OpenAI, url: str) -> None:
    route = "/v1/chat/completions"
    before = metric(url, "loom_requests_total", route=route, model="o2", status="200")
    tokens = metric(url, "loom_completion_tokens_total", model="o2")
    ttft = metric(url, "loom_time_to_first_token_seconds_count", model="o2")
    hits = metric(url, "loom_prefix_cache_hits_total")
    client.chat.completions.create(model="o2", messages=MSG, max_tokens=5, temperature=0)
    client.chat.completions.create(model="o2", messages=MSG, max_tokens=5, temperature=0)  # same prompt
    assert metric(url, "loom_prefix_cache_hits_total") >= hits + 1
    assert (
        metric(url, "loom_prefix_cache_tokens_saved_total") > 0 and metric(url, "loom_prefix_cache_bytes") > 0
    )
    assert metric(url, "loom_requests_total", route=route, model="o2", status="200") == before + 2
    assert metric(url, "loom_completion_tokens_total", model="o2") == tokens + 10
    assert metric(url, "loom_time_to_first_token_seconds_count", model="o2") == ttft + 2
    assert metric(url, "loom_inter_token_latency_seconds_count") >= 4
    assert metric(url, "loom_adapter_loads_total") >= 1 and metric(url, "loom_resident_adapters") >= 1
    for name in (
        "loom_queue_depth",
        "loom_running_batch_size",
        "loom_oom_events_total",
        "loom_adapter_evictions_total",
        "loom_model_preload_failures_total",
    ):
        assert name in httpx.get(f"{url}/metrics").text


# ----------------------------------------------------------------- pools and adapters
def test_pools_and_hot_swap_under_load(url: str, engine: Engine) -> None:
    made = httpx.post(f"{url}/workers/pools", json={"adapter": "qv4", "warm_size": 2})
    assert made.status_code == 201, made.text
    pool = made.json()
    assert pool["adapter"] == "qv4@v1"
    over = httpx.post(f"{url}/workers/pools", json={"agent": "bot", "warm_size": 3})
    assert over.status_code == 409 and "over by 1" in over.json()["error"]["message"]
    wrong_base = httpx.post(f"{url}/workers/pools", json={"base": "other", "adapter": "qv4"})
    assert wrong_base.status_code == 400 and wrong_base.json()["error"]["param"] == "base"

    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": "qv4", "messages": MSG, "max_tokens": 16, "ignore_eos": True},
                )
                results.append((r.status_code, r.json().get("system_fingerprint")))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    started = time.monotonic()
    while len(results) < 3 and time.monotonic() - started < 60:  # v1 answers in, more running
        time.sleep(0.02)
    swapped = httpx.post(f"{url}/workers/pool/{pool['id']}/swap", json={"version": "v2"}, timeout=60)
    assert swapped.status_code == 200 and swapped.json()["adapter"] == "qv4@v2"
    deadline = time.monotonic() + 60  # load until requests started after the swap have answered
    while not any(v == "qv4@v2" for _, v in results[-3:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    statuses = [s for s, _ in results]
    versions = [v for _, v in results]
    assert statuses and set(statuses) == {200}, statuses  # no request failed across the swap
    assert "qv4@v1" in versions and versions[-1] == "qv4@v2"
    listed = httpx.get(f"{url}/workers/pools").json()["pools"]
    assert [p["adapter"] for p in listed] == ["qv4@v2"] and listed[0]["resident"]
    assert httpx.delete(f"{url}/workers/pool/{pool['id']}").json()["deleted"]
    assert httpx.get(f"{url}/workers/pools").json()["pools"] == []
    assert httpx.delete(f"{url}/workers/pool/{pool['id']}").status_code == 404
    engine.swap_adapter("qv4", "v1")  # leave the shared engine as other tests expect it


def test_vllm_load_and_unload_lora_adapter(client: openai.OpenAI, url: str) -> None:
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": "o2@v1"})
    assert r.status_code == 200 and "Success" in r.text
    out = client.chat.completions.create(model="mine", messages=MSG, max_tokens=2)
    assert out.system_fingerprint == "o2@v1"
    assert "mine" in {m.id for m in client.models.list().data}
    escape = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})
    assert escape.status_code == 400
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "mine"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="mine", messages=MSG, max_tokens=2)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "mine"}).status_code == 404


# ----------------------------------------------------------------- limits
def test_auth_keys(engine: Engine) -> None:
    cfg = ServeConfig(api_key="user-key", admin_key="admin-key")
    with serve_in_thread(create_app(cfg, engine=engine)) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{url}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="user-key", max_retries=0)
        assert good.models.list().data
        user = {"Authorization": "Bearer user-key"}
        admin = {"Authorization": "Bearer admin-key"}
        denied = httpx.post(f"{url}/workers/pools", json={"adapter": "o2"}, headers=user)
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
        assert httpx.post(f"{url}/workers/pools", json={"adapter": "o2"}).status_code == 401
        made = httpx.post(f"{url}/workers/pools", json={"adapter": "o2", "warm_size": 0}, headers=admin)
        assert made.status_code == 201
        httpx.delete(f"{url}/workers/pool/{made.json()['id']}", headers=admin)


def test_full_queue_answers_429_with_retry_after(engine: Engine) -> None:
    cfg = ServeConfig(max_queue=2)  # the engine's batch is 4: 6 in flight at most

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model": "tiny", "messages": MSG, "max_tokens": 60, "ignore_eos": True}
            return list(
                await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(12)))
            )

    with serve_in_thread(create_app(cfg, engine=engine)) as url:
        responses = asyncio.run(fire(url))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429} and codes.count(200) >= 6, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
        assert metric(url, "loom_rejected_total", reason="queue_full") == codes.count(429)


def test_client_disconnect_cancels_generation(url: str, engine: Engine) -> None:
    body = {"model": "tiny", "messages": MSG, "max_tokens": 230, "ignore_eos": True}
    started = time.monotonic()
    full = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    took = time.monotonic() - started  # how long the whole generation takes here
    assert full.json()["usage"]["completion_tokens"] == 230, full.text
    wait_idle(engine)
    before = metric(url, "loom_cancelled_total")

    generated = engine.stats()["tokens_generated"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        assert '"role": "assistant"' in next(lines)  # the stream has started
        assert '"content"' in next(line for line in lines if line)
    wait_idle(engine)
    assert engine.stats()["tokens_generated"] - generated < 230  # stopped before the end

    generated = engine.stats()["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):  # a blocking request whose client gives up
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=took / 5))
    wait_idle(engine)
    assert engine.stats()["tokens_generated"] - generated < 230
    assert metric(url, "loom_cancelled_total") == before + 2
    deadline = time.monotonic() + 5
    while metric(url, "loom_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(url, "loom_requests_in_flight") == 0  # every admission was released


def test_request_timeout_is_504(engine: Engine) -> None:
    with serve_in_thread(create_app(ServeConfig(request_timeout_s=0.2), engine=engine)) as url:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny", "messages": MSG, "max_tokens": 230, "ignore_eos": True},
        )
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    wait_idle(engine)


def test_graceful_shutdown_drains_running_requests(engine: Engine) -> None:
    result: dict[str, Any] = {}
    with serve_in_thread(create_app(ServeConfig(), engine=engine)) as url:

        def call() -> None:
            result["r"] = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=60,
                json={"model": "tiny", "messages": MSG, "max_tokens": 120, "ignore_eos": True},
            )

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.2)  # running when the server is told to stop (leaving the with block)
    caller.join()
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 120
