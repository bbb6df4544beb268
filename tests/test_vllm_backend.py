"""Integration: ``loom serve --backend vllm`` with a REAL vLLM (its CPU build, in its own
environment: ``make vllm``) on the SmolLM2 default base with two adapters, spoken to through
Loom's gateway by the official ``openai`` client.

CI builds that environment and runs these with LOOM_REQUIRE_VLLM=1, which turns a missing
environment into a failure instead of a skip."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from loom.engine import Engine, SamplingParams
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store
from loom.vllm.engine import VLLMEngine
from loom.vllm.options import VLLMOptions
from loom.vllm.supervisor import group_alive

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
BASE = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("LOOM_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
PROMPTS = [
    ("What is the capital of France?", None),
    ("Name three colours.", "vsupport-lora"),
    ("Say hello to Ana.", "vbilling-lora"),
    ("Count from one to five.", "vsupport-lora"),
    ("What is two plus two?", None),
    ("Write a word that rhymes with cat.", "vbilling-lora"),
]

if not Path(VLLM_PYTHON).is_file():
    if os.environ.get("LOOM_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"LOOM_REQUIRE_VLLM=1 but {VLLM_PYTHON} does not exist: run `make vllm`")
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (build it with `make vllm`)", allow_module_level=True)


@dataclass
class Gateway:
    url: str
    client: openai.OpenAI
    engine: VLLMEngine
    store: Store


@pytest.fixture(scope="module")
def gateway(default_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from helpers import make_lora_adapter

    from loom.store.adapters import publish_adapter

    tmp = tmp_path_factory.mktemp("vllm-adapters")
    base_dir = Path(default_store.backend.local_path(default_store.resolve(BASE).rel) or "")
    for i, name in enumerate(("vsupport", "vbilling")):  # not test_serve_default_base's names: one store
        for version in ("v1", "v2"):
            seed = 10 * i + (version == "v2")
            folder = make_lora_adapter(
                base_dir, tmp / f"{name}-{version}", seed=seed, r=8, targets=("q_proj", "v_proj"), b_std=0.05
            )
            alias = "current" if version == "v1" else None
            publish_adapter(
                default_store,
                folder,
                agent=name,
                name=f"{name}-lora",
                base=BASE,
                version=version,
                alias=alias,
            )
    cfg = ServeConfig(
        device="cpu",
        dtype="float32",  # as the Loom engine it is compared with (auto may measure bf16 faster)
        max_batch_size=8,
        max_seq_len=512,
        kv_cache_mb=1024,
        preload=["vsupport-lora"],
        backend="vllm",
        alias_refresh_s=0.5,
        vllm=VLLMOptions(python=VLLM_PYTHON, log_path=tmp / "vllm.log"),
    )
    app = create_app(cfg, store=default_store)
    with serve_in_thread(app) as url:
        engine = app.state.service.engine
        assert isinstance(engine, VLLMEngine)
        yield Gateway(
            url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), engine, default_store
        )
    proc = engine.supervisor.proc
    assert proc is not None and proc.poll() is not None, "vLLM outlived the server's shutdown"
    assert group_alive(proc.pid) == [], "vLLM's engine core or workers outlived the server"


def _chat(client: openai.OpenAI, text: str, model: str | None) -> tuple[str, str | None]:
    out = client.chat.completions.create(
        model=model or BASE, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0
    )
    return out.choices[0].message.content or "", out.system_fingerprint


def test_mixed_adapters_in_one_burst_equal_loom_engine(gateway: Gateway) -> None:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: _chat(gateway.client, *p), PROMPTS))
    fingerprints = {model: fp for (_, model), (_, fp) in zip(PROMPTS, answers, strict=True)}
    assert fingerprints["vsupport-lora"] == "vsupport-lora@v1"
    assert fingerprints["vbilling-lora"] == "vbilling-lora@v1"
    assert fingerprints[None] and fingerprints[None].startswith(BASE + "@")
    # the same prompts, greedy, through Loom's own engine on the same store
    engine = Engine.from_store(BASE, store=gateway.store, device="cpu", dtype="float32", max_seq_len=512)
    try:
        messages = [[{"role": "user", "content": text}] for text, _ in PROMPTS]
        params = SamplingParams(max_new_tokens=16)
        ours = engine.generate_many(
            [(m, a) for m, (_, a) in zip(messages, PROMPTS, strict=True)], params=params
        )
    finally:
        engine.shutdown()
    # Both run the same fp32 weights and the same token ids; kernels differ (oneDNN/torch GEMMs
    # here, vLLM's CPU attention and punica LoRA there), so logits differ in the last bits.
    # Greedy text is equal unless two tokens tie within that noise, which these prompts avoid.
    assert [a for a, _ in answers] == [c.text for c in ours]


def test_runtime_load_and_json_schema(gateway: Gateway) -> None:
    # billing-lora was not preloaded: the first request registered it in vLLM at runtime
    _chat(gateway.client, "Hi", "vbilling-lora")
    assert "vbilling-lora@v1" in gateway.engine.loaded
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = gateway.client.chat.completions.create(
        model="vbilling-lora",
        messages=[{"role": "user", "content": "Which city is the capital of Italy? Answer in JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert set(json.loads(out.choices[0].message.content or "")) == {"city"}


def test_promotion_reaches_vllm_without_restart(gateway: Gateway) -> None:
    pid = gateway.engine.supervisor.proc.pid  # type: ignore[union-attr]
    before = _chat(gateway.client, "Tell me a fact.", "vsupport-lora")
    assert before[1] == "vsupport-lora@v1"
    gateway.store.set_alias("vsupport-lora", "current", "v2")
    deadline = time.monotonic() + 10
    while (after := _chat(gateway.client, "Tell me a fact.", "vsupport-lora"))[1] != "vsupport-lora@v2":
        assert time.monotonic() < deadline, "the alias move did not reach the gateway"
        time.sleep(0.2)
    assert after[0] != before[0]  # another adapter answered, in the same vLLM
    assert gateway.engine.supervisor.proc.pid == pid  # type: ignore[union-attr]
    # and back, with a hot-swap through the pools API
    r = httpx.post(
        f"{gateway.url}/workers/pools", json={"adapter": "vsupport-lora", "warm_size": 1}, timeout=60
    )
    assert r.status_code == 201, r.text
    pool = r.json()["id"]
    r = httpx.post(f"{gateway.url}/workers/pool/{pool}/swap", json={"version": "v1"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _chat(gateway.client, "Tell me a fact.", "vsupport-lora") == before


def test_metrics_include_vllm_relabelled(gateway: Gateway) -> None:
    time.sleep(2.5)  # one scrape interval
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert "loom_requests_total" in text
    assert "loom_vllm_num_requests_running" in text
    assert not [line for line in text.splitlines() if line.startswith("vllm:")]


def test_a_dead_vllm_is_restarted_and_health_says_so(gateway: Gateway) -> None:
    sup = gateway.engine.supervisor
    assert sup.proc is not None
    os.killpg(sup.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "/health kept answering 200 with vLLM dead"
        time.sleep(0.2)
    health = httpx.get(f"{gateway.url}/health", timeout=5).json()
    assert health["status"] == "restarting" and "vLLM exited" in health["error"]
    deadline = time.monotonic() + 300
    while httpx.get(f"{gateway.url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, f"vLLM was not back within 300 s:\n{sup.log_tail()}"
        time.sleep(1)
    assert sup.restarts == 1
    # adapters registered before the crash were registered again
    assert _chat(gateway.client, "Hi", "vbilling-lora")[1] == "vbilling-lora@v1"
