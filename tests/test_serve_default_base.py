"""Integration: ``loom serve`` on the embedded SmolLM2 default base with a few adapters, spoken
to by the official ``openai`` client, unchanged: model list, chat, streaming, JSON mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store

pytestmark = pytest.mark.integration
BASE = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(default_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    from helpers import make_lora_adapter

    from loom.store.adapters import publish_adapter

    tmp = tmp_path_factory.mktemp("serve-adapters")
    base_dir = Path(default_store.backend.local_path(default_store.resolve(BASE).rel) or "")
    for i, name in enumerate(("support", "billing")):
        folder = make_lora_adapter(base_dir, tmp / name, seed=i, r=4, targets=("q_proj", "v_proj"))
        publish_adapter(
            default_store, folder, agent=name, name=f"{name}-lora", base=BASE, version="v1", alias="current"
        )
    cfg = ServeConfig(device="cpu", max_batch_size=8, max_seq_len=512, preload=["support-lora"])
    with serve_in_thread(create_app(cfg, store=default_store)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_model_list(client: openai.OpenAI) -> None:
    ids = {m.id: m for m in client.models.list().data}
    assert {BASE, "support-lora", "billing-lora"} <= set(ids)
    assert ids["billing-lora"].parent == BASE


def test_chat_answers_from_the_base(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (out.choices[0].message.content or "")
    assert out.system_fingerprint and out.system_fingerprint.startswith(BASE + "@")


def test_stream_through_an_adapter(client: openai.OpenAI) -> None:
    kw = dict(model="billing", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert whole.system_fingerprint == "billing-lora@v1"  # the agent folder's one adapter
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_json_mode(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="support-lora",
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with name and age."}],
    )
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
