"""The agents runtime's backend over vLLM: a batch of agent jobs goes to vLLM as concurrent
requests (vLLM batches them, mixed adapters included), each with its JSON schema or regex as
vLLM's structured outputs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from loom.agents.backends import ModelJob
from loom.agents.result import Generated
from loom.engine.types import LogitsProcessor
from loom.vllm.engine import VLLMEngine

MAX_CONCURRENT = 64


class VLLMBackend:
    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="loom-vllm-agents")

    @property
    def base_ref(self) -> str | None:
        return self.engine.base_ref

    def generate(self, jobs: list[ModelJob], timeout_s: float) -> list[Generated]:
        deadline = time.monotonic() + timeout_s
        futures = [self.pool.submit(self._one, job, deadline) for job in jobs]
        return [f.result() for f in futures]

    def _one(self, job: ModelJob, deadline: float) -> Generated:
        guided: LogitsProcessor | None = None
        if job.schema is not None or job.json_mode:
            guided = self.engine.json_processor(job.schema)
        elif job.regex is not None:
            guided = self.engine.regex_processor(job.regex)
        left = deadline - time.monotonic()
        if left <= 0:
            return Generated("", error="timed out", error_kind="timeout")
        try:
            c = self.engine.complete(
                job.prompt_ids, adapter=job.adapter, params=job.params, logits_processor=guided, timeout=left
            )
        except Exception as exc:  # unknown adapter, prompt too long: this job only
            return Generated("", error=str(exc), error_kind="adapter" if job.adapter else "input")
        kind = c.error_kind or ("engine" if c.finish_reason == "error" else None)
        return Generated(c.text, c.adapter, c.error, kind, c.prompt_tokens, len(c.token_ids))
