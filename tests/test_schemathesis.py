"""schemathesis against the OpenAPI schema a real server on the tiny model serves (uvicorn on
loopback): for every operation, valid and invalid requests, a bounded number of each. No answer
is a 5xx, and every 4xx is in OpenAI's error shape."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loom.engine import Engine
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store

schemathesis = pytest.importorskip("schemathesis")  # the dev extra; absent: skip, not fail
hypothesis = pytest.importorskip("hypothesis")

# per operation and mode: the whole test stays well under a minute here (more: set the variable)
EXAMPLES = int(os.environ.get("LOOM_SCHEMATHESIS_EXAMPLES", "12"))
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def url(engine_store: Store) -> Iterator[str]:
    # Its own engine: generated admin calls (pools, LoRA loads) must not change the shared one.
    engine = Engine.from_store(
        "tiny", device="cpu", store=engine_store, max_batch_size=4, max_seq_len=48, kv_cache_mb=4,
        max_adapters=2, max_rank=8,
    )  # fmt: skip
    cfg = ServeConfig(max_queue=64, default_max_tokens=4, request_timeout_s=30)
    try:
        with serve_in_thread(create_app(cfg, engine=engine)) as served:
            yield served
    finally:
        engine.shutdown()


def check(case: Any, response: Any) -> None:
    text = response.content.decode(errors="replace")[:300]
    where = f"{case.method} {case.formatted_path} {case.body!r:.300} -> {response.status_code}: {text}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where


def test_every_operation_answers_valid_and_invalid_requests_without_5xx(url: str) -> None:
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    settings = hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        # the same cases on every run, so a failure reproduces (unset it to explore)
        derandomize=not os.environ.get("LOOM_SCHEMATHESIS_RANDOM"),
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: bounded time
    )
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call(base_url=url, timeout=30)
                statuses[response.status_code] += 1
                check(case, response)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
                # an operation without parameters or body has no invalid request to make
    print(dict(statuses))
    assert statuses[200] and statuses[400] and sum(statuses.values()) >= len(operations) * EXAMPLES
