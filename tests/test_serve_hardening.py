"""What the server does for operators and against other clients, over real HTTP on loopback:
start-up warnings and --require-keys, conversations bound to their key, a damaged store and
unexpected errors (500s that leak nothing), and the BOS token of plain-text prompts."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loom.cli.main import app as cli
from loom.engine import Engine, EngineConfig, SamplingParams
from loom.errors import LoomError
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store
from loom.testing import make_tiny_model, make_tokenizer

SMALL = dict(max_batch_size=4, max_seq_len=128, kv_cache_mb=8, max_adapters=2, max_rank=8)


@pytest.fixture(scope="module")
def engine(engine_store: Store) -> Iterator[Engine]:
    eng = Engine.from_store("tiny", device="cpu", store=engine_store, **SMALL)
    yield eng
    eng.shutdown()


# ----------------------------------------------------------------- keys at start-up
def test_open_servers_are_announced_and_require_keys_refuses(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="loom.serve"):
        create_app(ServeConfig(host="0.0.0.0", api_key=None, admin_key=None), engine=engine)
    said = caplog.text
    assert "--host 0.0.0.0 listens beyond this machine" in said and "LOOM_API_KEY" in said
    assert "admin routes" in said and "LOOM_ADMIN_KEY" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loom.serve"):
        create_app(ServeConfig(host="0.0.0.0", api_key="k", admin_key="a"), engine=engine)
        create_app(ServeConfig(host="::1", api_key="k", admin_key=None), engine=engine)
    assert "SECURITY" not in caplog.text  # keys set: nothing to warn about
    with pytest.raises(LoomError, match=r"--require-keys.*LOOM_API_KEY"):
        create_app(ServeConfig(require_keys=True, api_key=None), engine=engine)
    create_app(ServeConfig(require_keys=True, api_key="k"), engine=engine)  # keys given: starts
    refused = CliRunner().invoke(
        cli, ["serve", "--stub", "--require-keys", "--port", "1"], env={"LOOM_API_KEY": ""}
    )
    assert refused.exit_code == 2 and "LOOM_API_KEY" in refused.output, refused.output


# ----------------------------------------------------------------- conversations
def test_conversation_ids_are_made_by_the_server_and_bound_to_the_key(engine: Engine) -> None:
    cfg = ServeConfig(api_key="user-key", admin_key="other-key")
    alice, mallory = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer other-key"}
    with serve_in_thread(create_app(cfg, engine=engine)) as url:
        chosen = httpx.post(
            f"{url}/chat", json={"message": "hi", "session_id": "my-own-id", "max_tokens": 2}, headers=alice
        )
        assert chosen.status_code == 404 and chosen.json()["error"]["code"] == "session_not_found"
        first = httpx.post(f"{url}/chat", json={"message": "hi", "max_tokens": 2}, headers=alice).json()
        session = first["session_id"]
        assert session.startswith("sess-") and len(session) >= 32  # 192 random bits
        other = httpx.post(f"{url}/chat", json={"message": "x", "max_tokens": 2}, headers=alice).json()
        assert other["session_id"] != session
        for call in (
            lambda h: httpx.get(f"{url}/conversation", params={"session_id": session}, headers=h),
            lambda h: httpx.post(
                f"{url}/chat", json={"message": "more", "session_id": session, "max_tokens": 2}, headers=h
            ),
        ):
            stolen = call(mallory)
            assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "session_not_found"
            assert call(alice).status_code == 200
        gone = httpx.delete(f"{url}/conversation", params={"session_id": session}, headers=mallory)
        assert gone.status_code == 404
        history = httpx.get(f"{url}/conversation", params={"session_id": session}, headers=alice).json()
        assert len(history["messages"]) == 4  # two turns of alice, nothing of mallory's


# ----------------------------------------------------------------- 500s
def test_damaged_store_is_a_500_with_the_fix(engine_store: Store, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(engine_store.url, root)
    store = Store(root)
    eng = Engine.from_store("tiny", device="cpu", store=store, **SMALL)
    try:
        with serve_in_thread(create_app(ServeConfig(), engine=eng)) as url:
            manifest = next((root).rglob("o2/versions/v1/manifest.json"))
            manifest.write_text("{damaged")
            r = httpx.post(
                f"{url}/v1/completions", json={"model": "o2@v1", "prompt": "the quick", "max_tokens": 2}
            )
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["code"] == "store_damaged" and "loom store verify" in error["message"]
            assert str(root) not in error["message"]  # no server paths to clients
            assert r.headers["x-request-id"] in error["message"]
            # weights that fail their checksum when the engine reads them: the server's 500, not
            # the caller's 400, and the engine's text (file names, hashes) stays in the log
            weights = next(root.rglob("all8/versions/v1/**/adapter_model.safetensors"))
            weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
            r = httpx.post(
                f"{url}/v1/completions", json={"model": "all8@v1", "prompt": "the quick", "max_tokens": 2}
            )
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["code"] == "adapter_unreadable" and "all8@v1" in error["message"]
            assert "sha256" not in r.text and "safetensors" not in r.text
    finally:
        eng.shutdown()


def test_unexpected_errors_leak_nothing_and_carry_a_request_id(
    engine: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = create_app(ServeConfig(), engine=engine)
    with serve_in_thread(server) as url:

        def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("cannot open /srv/secret/weights.bin")

        monkeypatch.setattr(server.state.service.registry, "models", broken)
        with caplog.at_level(logging.ERROR, logger="loom.serve"):
            r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 500
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        assert "secret" not in r.text and "RuntimeError" not in r.text
        request_id = r.headers["x-request-id"]
        assert request_id in error["message"]
        logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
        assert logged and "/srv/secret/weights.bin" in str(logged[0].exc_info[1])  # type: ignore[index]


# ----------------------------------------------------------------- BOS
@pytest.fixture(scope="module")
def bos_engine() -> Iterator[Engine]:
    """The tiny model with a tokenizer that, like Llama's and Mistral's, prepends <s> to text."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    config = EngineConfig(max_batch_size=4, max_seq_len=128, kv_cache_mb=8, max_adapters=2, max_rank=8)
    eng = Engine(make_tiny_model(), tokenizer, config=config, base_ref="stub@bos")
    yield eng
    eng.shutdown()


def test_text_prompts_get_the_bos_once_and_chat_prompts_none_added(bos_engine: Engine) -> None:
    tok = bos_engine.tokenizer
    bos = tok.bos_token_id
    plain = tok("the quick", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    with_bos = bos_engine.generate([bos, *plain], params=greedy).text
    with serve_in_thread(create_app(ServeConfig(), engine=bos_engine)) as url:
        body: dict[str, Any] = {"prompt": "the quick", "max_tokens": 4, "temperature": 0}
        out = httpx.post(f"{url}/v1/completions", json={**body, "echo": True}).json()
        assert out["usage"]["prompt_tokens"] == len(plain) + 1
        assert out["choices"][0]["text"] == "the quick" + with_bos  # echoed as sent, no "<s>"
        native = httpx.post(f"{url}/generate", json=body).json()
        assert native["usage"]["prompt_tokens"] == len(plain) + 1 and native["text"] == with_bos
        once = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "<s>the quick"}).json()
        assert once["usage"]["prompt_tokens"] == len(plain) + 1  # never two
        ids = httpx.post(f"{url}/v1/completions", json={**body, "prompt": plain}).json()
        assert ids["usage"]["prompt_tokens"] == len(plain)  # token ids are taken as given
        messages = [{"role": "user", "content": "the quick"}]
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
        templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat["usage"]["prompt_tokens"] == len(tok(templated, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------- what schemathesis found
def test_requests_schemathesis_broke_are_answered(engine: Engine) -> None:
    msg = [{"role": "user", "content": "hi"}]
    with serve_in_thread(create_app(ServeConfig(api_key=None, admin_key=None), engine=engine)) as url:
        tiny = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": msg, "max_tokens": 3, "temperature": 1e-300}
        )
        greedy = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": msg, "max_tokens": 3, "temperature": 0}
        )
        assert tiny.status_code == 200, tiny.text  # as vLLM: under 1e-5 is greedy, not NaN
        assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
        for penalty in (5e-324, 1e9):
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": msg, "max_tokens": 3, "repetition_penalty": penalty},
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty", r.text
        for route, body in (
            ("/v1/chat/completions", {"model": "~no-such-user", "messages": msg}),
            ("/generate", {"prompt": "x", "adapter": "~no-such-user/x"}),
            ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "~no-such-user"}),
            ("/workers/pools", {"agent": "~no-such-user"}),
        ):
            r = httpx.post(f"{url}{route}", json=body)
            assert r.status_code == 400 and "is a path" in r.json()["error"]["message"], (route, r.text)


# ----------------------------------------------------------------- pools
def test_a_pools_warm_size_reserves_batch_rows_for_its_requests(engine: Engine) -> None:
    """Batch 4, a pool for qv4 reserving 2 rows: a flood of base requests runs 2 at a time, and
    a qv4 request sent in the middle of the flood starts at once instead of queueing behind it."""
    long = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 60}
    peak: list[int] = []

    async def flood(url: str) -> tuple[list[httpx.Response], httpx.Response, float, float]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            others = [
                asyncio.ensure_future(http.post("/v1/chat/completions", json={**long, "ignore_eos": True}))
                for _ in range(6)
            ]
            while engine.stats()["batch_size"] < 2:
                await asyncio.sleep(0.005)
            started = time.monotonic()
            mine = await http.post(
                "/v1/completions", json={"model": "qv4", "prompt": "the quick", "max_tokens": 4}
            )
            took = time.monotonic() - started
            done = await asyncio.gather(*others)
            return list(done), mine, took, time.monotonic() - started

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            peak.append(engine.stats()["batch_size"])
            time.sleep(0.002)

    with serve_in_thread(create_app(ServeConfig(max_queue=16), engine=engine)) as url:
        pool = httpx.post(f"{url}/workers/pools", json={"adapter": "qv4", "warm_size": 2}).json()
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(stop,))
        watcher.start()
        try:
            others, mine, took, flood_left = asyncio.run(flood(url))
        finally:
            stop.set()
            watcher.join()
        assert mine.status_code == 200 and all(r.status_code == 200 for r in others), mine.text
        assert max(peak) <= 3, max(peak)  # 2 base rows + the pool's request, never the whole batch
        assert took < flood_left / 2, (took, flood_left)  # it did not wait for the flood
        wide = httpx.post(f"{url}/v1/chat/completions", json={**long, "n": 3, "max_tokens": 1})
        assert wide.status_code == 400 and "warm_size" in wide.json()["error"]["message"]
        httpx.delete(f"{url}/workers/pool/{pool['id']}")
        free = httpx.post(f"{url}/v1/chat/completions", json={**long, "n": 3, "max_tokens": 1})
        assert free.status_code == 200  # no reservation left: the whole batch is open again
