"""The SDK (loom.client) against real servers on loopback: two stub Loom servers, and tiny real
HTTP servers that misbehave the ways endpoints do (refuse, load, hang, drop after the body, 500).
No transport is mocked: failover is observed from what each server actually received."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from loom.client import (
    AgentRun,
    AllEndpointsFailed,
    AsyncClient,
    ChatReply,
    Client,
    Generation,
    LoomAPIError,
    LoomConnectionError,
)
from loom.serve import ServeConfig, create_app
from loom.serve.errors import APIError
from loom.serve.server import free_port, serve_in_thread

KEY, ADMIN = "sdk-key", "sdk-admin"
STUB_VERSION = "stub@tiny-random"
FAST = {"api_key": KEY, "max_retries": 0, "timeout": 10.0}  # one pass, no backoff sleeps


# ----------------------------------------------------------------- real Loom servers
def stub_config(tmp: Path, name: str) -> ServeConfig:
    agents = tmp / f"{name}-agents.json"
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    echo = {"system": "Be terse.", "input": schema, "generation": {"max_tokens": 4}}
    agents.write_text(json.dumps({"agents": {"echo": echo}}))
    return ServeConfig(
        stub=True,
        agents_file=agents,
        api_key=KEY,
        admin_key=ADMIN,
        request_log=tmp / f"{name}-requests.sqlite",
    )


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("client")
    with (
        serve_in_thread(create_app(stub_config(tmp, "a"))) as a,
        serve_in_thread(create_app(stub_config(tmp, "b"))) as b,
    ):
        yield a, b


@pytest.fixture
def a(stubs: tuple[str, str]) -> str:
    return stubs[0]


@pytest.fixture
def b(stubs: tuple[str, str]) -> str:
    return stubs[1]


def served(url: str, route: str) -> float:
    """How many requests a Loom server answered on ``route`` (its Prometheus counter)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("loom_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------- misbehaving endpoints
@dataclass
class Fake:
    """A real HTTP server on loopback that misbehaves in one way, and records what it received."""

    mode: str  # loading | hang | drop | error500
    hits: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""


def _loom_error(status: int, message: str, type_: str, code: str) -> bytes:
    return bytes(APIError(status, message, type_, code).response().body)  # the server's own shape


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)  # the whole body arrived: the request may now "have run"
            fake.hits.append(f"{self.command} {self.path}")
            if fake.mode == "loading":
                if self.path.startswith("/health"):
                    return self._answer(503, b'{"status": "loading"}')
                body = _loom_error(
                    503,
                    "the server is loading; retry when GET /health answers 200",
                    "service_unavailable",
                    "loading",
                )
                return self._answer(503, body, **{"Retry-After": "0"})
            if fake.mode == "error500":
                return self._answer(
                    500,
                    _loom_error(
                        500, "internal server error (request id req_1)", "server_error", "internal_error"
                    ),
                )
            if fake.mode == "hang":
                fake.release.wait(30)
            self.close_connection = True  # drop (or, after hanging, give up): no response at all

        do_GET = do_POST = do_DELETE = _any

    return Handler


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[Fake]:
    made = Fake(request.param)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(made))
    server.daemon_threads, server.block_on_close = True, False
    made.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield made
    made.release.set()
    server.shutdown()
    server.server_close()


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused


# ----------------------------------------------------------------- failover
def test_refused_endpoint_fails_over_and_results_are_typed(a: str) -> None:
    refused = closed_port()
    with Client([refused, a], **FAST) as client:
        gen = client.generate("hello", max_tokens=3)
        states = {s.url: s for s in client.endpoint_states}
    assert isinstance(gen, Generation) and gen.endpoint == a
    assert gen.model_version == STUB_VERSION and gen.response_id and gen.usage.completion_tokens == 3
    assert not states[refused].up and "ConnectError" in (states[refused].last_error or "")
    assert states[a].up


@pytest.mark.parametrize("fake", ["loading"], indirect=True)
def test_503_loading_fails_over_even_for_a_post(fake: Fake, b: str) -> None:
    with Client([fake.url, b], **FAST) as client:
        reply = client.chat("hi", max_tokens=2)
    assert reply.endpoint == b and fake.hits == ["POST /chat"]


@pytest.mark.parametrize("fake", ["hang"], indirect=True)
def test_hanging_endpoint_fails_over_past_the_timeout(fake: Fake, a: str) -> None:
    with Client([fake.url, a], **{**FAST, "timeout": 0.5}) as client:
        started = time.monotonic()
        models = client.models()  # GET: idempotent, re-sent after the read timeout
        assert time.monotonic() - started < 5
        assert models[0].endpoint == a and {m.id for m in models} >= {"stub", "echo"}
        assert fake.hits == ["GET /v1/models"]
        # now marked down: the next call skips it without waiting out another timeout
        started = time.monotonic()
        assert client.info().endpoint == a and time.monotonic() - started < 0.5
        assert fake.hits == ["GET /v1/models"]


@pytest.mark.parametrize("fake", ["drop", "hang"], indirect=True)
def test_a_post_that_may_have_run_is_not_resent_unless_allowed(fake: Fake, b: str) -> None:
    before = served(b, "/generate")
    options = {**FAST, "timeout": 0.5}
    with Client([fake.url, b], **options) as client, pytest.raises(LoomConnectionError) as caught:
        client.generate("hello", max_tokens=2)
    assert caught.value.may_have_run and caught.value.endpoint == fake.url
    assert "retry_unsafe=True" in str(caught.value)
    assert fake.hits == ["POST /generate"] and served(b, "/generate") == before  # B never saw it
    with Client([fake.url, b], **{**FAST, "timeout": 0.5}) as client:
        gen = client.generate("hello", max_tokens=2, retry_unsafe=True)
    assert gen.endpoint == b and served(b, "/generate") == before + 1
    assert fake.hits == ["POST /generate"] * 2


@pytest.mark.parametrize("fake", ["error500"], indirect=True)
def test_a_500_is_not_resent_for_a_post_but_is_for_a_get(fake: Fake, a: str) -> None:
    with Client([fake.url, a], **FAST) as client:
        with pytest.raises(LoomAPIError) as caught:
            client.agents.run("echo", {"text": "hi"})
        assert caught.value.status == 500 and caught.value.code == "internal_error"
        assert caught.value.endpoint == fake.url and "retry_unsafe" in str(caught.value)
        assert client.info().endpoint == a  # a GET may go on
        run = client.agents.run("echo", {"text": "hi"}, retry_unsafe=True)
    assert run.endpoint == a
    assert fake.hits == ["POST /v1/agents/echo/run", "GET /info", "POST /v1/agents/echo/run"]


def test_the_first_endpoint_is_preferred_again_once_it_is_back(tmp_path: Path, b: str) -> None:
    port = free_port()
    first = f"http://127.0.0.1:{port}"
    with Client([first, b], **FAST, cooldown_s=0.5) as client:
        assert client.generate("x", max_tokens=1).endpoint == b
        with serve_in_thread(create_app(stub_config(tmp_path, "back")), port=port):
            assert client.generate("x", max_tokens=1).endpoint == b  # still cooling down: not tried
            time.sleep(0.6)
            assert client.generate("x", max_tokens=1).endpoint == first  # probed, healthy, preferred
            assert all(s.up for s in client.endpoint_states)


def test_all_endpoints_failed_lists_every_endpoint_after_backing_off() -> None:
    one, two = closed_port(), closed_port()
    client = Client([one, two], api_key=KEY, max_retries=1, backoff_s=0.01, cooldown_s=0.01)
    with client, pytest.raises(AllEndpointsFailed) as caught:
        client.health()
    tried = [f.endpoint for f in caught.value.failures]
    assert tried.count(one) == 2 and tried.count(two) == 2  # two passes over both
    assert one in str(caught.value) and two in str(caught.value)


def test_a_4xx_is_the_callers_error_and_does_not_fail_over(a: str, b: str) -> None:
    before = served(b, "/v1/agents/{name}/run")
    with Client([a, b], **FAST) as client, pytest.raises(LoomAPIError) as caught:
        client.agents.run("nope", {"text": "hi"})
    assert (
        caught.value.status == 404 and caught.value.code == "agent_not_found" and caught.value.endpoint == a
    )
    assert served(b, "/v1/agents/{name}/run") == before
    with Client([a], **{**FAST, "api_key": "wrong"}) as client, pytest.raises(LoomAPIError) as caught:
        client.models()
    assert caught.value.status == 401 and caught.value.code == "invalid_api_key"


# ----------------------------------------------------------------- the surface
def test_chat_sessions_continue_and_stick_to_their_server(a: str, b: str) -> None:
    with Client([b, a], **FAST) as client:
        first = client.chat("hello", max_tokens=2, endpoint=a)  # started on a, the second choice
        again = client.chat("and again", session_id=first.session_id, max_tokens=2)
        history = client.conversation(first.session_id)
        assert isinstance(again, ChatReply) and again.session_id == first.session_id
        assert again.endpoint == a and history.endpoint == a  # b holds no such session
        assert [m["role"] for m in history.messages] == ["user", "assistant"] * 2
        assert again.model_version == STUB_VERSION and again.text == again.response
        assert client.delete_conversation(first.session_id)


def test_streams_yield_deltas_then_the_whole_answer(a: str) -> None:
    with Client([closed_port(), a], **FAST) as client:
        with client.chat_stream("hello", max_tokens=5) as stream:
            deltas = list(stream)
        reply = stream.result
        assert "".join(deltas) == reply.response and reply.endpoint == a and reply.session_id
        assert reply.model_version == STUB_VERSION and reply.usage.completion_tokens == 5
        follow = client.chat("more", session_id=reply.session_id, max_tokens=2)
        assert follow.session_id == reply.session_id
        text = client.generate_stream("hello", max_tokens=6, temperature=0)
        pieces = list(text)
        gen = text.result
    assert "".join(pieces) == gen.text and gen.usage.completion_tokens == 6
    assert gen.model_version == STUB_VERSION and gen.endpoint == a and gen.finish_reason == "length"


def test_agents_run_and_batch(a: str) -> None:
    with Client(a, **FAST) as client:
        run = client.agents.run("echo", {"text": "play jazz"})
        batch = client.agents.batch("echo", [{"text": "one"}, {"text": "two"}])
        listed = client.agents.list()
    assert isinstance(run, AgentRun) and run.agent == "echo" and run.endpoint == a
    assert run.model_version == STUB_VERSION and run.versions == {"base": STUB_VERSION, "adapter": None}
    assert run.response_id and run.fallback.kind == "base"
    assert len(batch) == 2 and all(r.model_version == STUB_VERSION and r.endpoint == a for r in batch)
    assert len({r.response_id for r in batch}) == 2 and [x.name for x in listed] == ["echo"]


def test_feedback_goes_to_the_server_that_answered(a: str, b: str) -> None:
    with Client([b, a], **FAST) as client:
        gen = client.generate("rate me", max_tokens=2, endpoint=a)
        receipt = client.feedback(gen, 1, comment="good")  # b's log has no such response
        with pytest.raises(LoomAPIError) as caught:
            client.feedback(gen.response_id or "", -1)  # a bare id: the first endpoint, b
    assert receipt.endpoint == a and receipt.stored and receipt.response_id == gen.response_id
    assert caught.value.status == 404 and caught.value.endpoint == b


def test_pools_and_admin_need_the_admin_key(a: str) -> None:
    with Client(a, **FAST) as client:
        assert client.pools.list() == []
        with pytest.raises(LoomAPIError) as caught:
            client.pools.create(adapter="ghost")
        assert caught.value.status == 403 and caught.value.code == "admin_key_required"
    with Client(a, **FAST, admin_key=ADMIN) as admin:
        with pytest.raises(LoomAPIError) as caught:
            admin.pools.delete("pool-9")
        assert caught.value.status == 404 and caught.value.code == "pool_not_found"
        with pytest.raises(LoomAPIError) as caught:
            admin.admin.unload_adapter("ghost")
        assert caught.value.status == 404 and caught.value.code == "lora_not_found"


def test_health_info_and_openai(a: str) -> None:
    refused = closed_port()
    with Client([refused, a], **FAST) as client:
        assert client.health().status == "ok"
        info = client.info()
        assert info.endpoint == a and info.base and info.base["ref"] == STUB_VERSION
        oai = client.openai(max_retries=0)
    assert str(oai.base_url).rstrip("/") == f"{a}/v1"
    done = oai.chat.completions.create(
        model="stub", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert done.choices[0].finish_reason == "length"
    with Client(refused, **FAST) as client, pytest.raises(AllEndpointsFailed):
        client.openai()


def test_conversation_export_and_import_move_a_session(a: str, b: str) -> None:
    paths = httpx.get(f"{a}/openapi.json").json()["paths"]
    missing = {"/conversations", "/conversation/export", "/conversation/import"} - set(paths)
    if missing:
        pytest.skip(f"this server has no {sorted(missing)} yet (persistent conversations are another branch)")
    with Client([a, b], **FAST) as client:
        started = client.chat("remember me", max_tokens=2, endpoint=a)
        assert started.session_id in {c.session_id for c in client.conversations(endpoint=a)}
        exported = client.export_conversation(started.session_id)
        moved = client.import_conversation(exported, endpoint=b)
        assert moved.endpoint == b and len(moved.messages) == 2
        follow = client.chat("still there?", session_id=moved.session_id, max_tokens=2)
    assert follow.endpoint == b


# ----------------------------------------------------------------- async
@pytest.mark.parametrize("fake", ["loading"], indirect=True)
def test_async_client_fails_over_streams_and_runs_agents(fake: Fake, a: str) -> None:
    async def main() -> None:
        async with AsyncClient([closed_port(), fake.url, a], **FAST) as client:
            gen = await client.generate("hello", max_tokens=3)
            assert gen.endpoint == a and gen.model_version == STUB_VERSION
            reply = await client.chat("hi", max_tokens=2)
            again = await client.chat("again", session_id=reply.session_id, max_tokens=2)
            assert again.session_id == reply.session_id
            stream = await client.chat_stream("hello", max_tokens=4)
            deltas = [d async for d in stream]
            assert "".join(deltas) == stream.result.response and stream.result.endpoint == a
            run = await client.agents.run("echo", {"text": "x"})
            assert run.model_version == STUB_VERSION and run.endpoint == a
            oai = await client.openai(max_retries=0)
            assert len((await oai.models.list()).data) >= 2

    asyncio.run(main())
    assert fake.hits == ["POST /generate"]  # marked down after its 503: later calls skip it


@pytest.mark.parametrize("fake", ["drop"], indirect=True)
def test_async_client_does_not_resend_a_post_that_may_have_run(fake: Fake, b: str) -> None:
    async def main() -> None:
        async with AsyncClient([fake.url, b], **FAST) as client:
            with pytest.raises(LoomConnectionError):
                await client.generate("hello", max_tokens=2)
        async with AsyncClient([fake.url, b], **FAST) as client:  # fresh: fake is not marked down
            gen = await client.generate("hello", max_tokens=2, retry_unsafe=True)
            assert gen.endpoint == b

    asyncio.run(main())
    assert fake.hits == ["POST /generate"] * 2
