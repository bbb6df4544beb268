"""``ServingEngine``: what the server, the agents runtime and evaluation need from an engine.

Loom's own ``Engine`` is one; ``loom.vllm.engine.VLLMEngine`` (vLLM as a child process) is the
other. Both take plain Loom types (token ids, ``SamplingParams``, adapter refs) and answer
``StreamChunk``/``Completion``, so every route, agent and gate runs unchanged on either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from loom.engine.engine import EngineConfig, Prompt
from loom.engine.resolver import AdapterResolver, ResolvedAdapter
from loom.engine.types import Completion, LogitsProcessor, SamplingParams, StreamChunk
from loom.store.store import Store


class ServingEngine(Protocol):
    config: EngineConfig
    store: Store | None
    base_ref: str | None
    base_fingerprint: str | None
    # told of every concrete adapter version before its files are fetched (leases, limits)
    version_listeners: list[Callable[[str], None]]
    resolver: AdapterResolver
    tokenizer: Any

    @property
    def max_len(self) -> int:
        """Prompt + generated tokens one request may hold."""
        ...

    def tokenize(self, prompt: Prompt) -> list[int]: ...

    def stream(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> AsyncIterator[StreamChunk]: ...

    def generate(self, prompt: Prompt, *, adapter: str | None = None, **kw: Any) -> Completion: ...

    def json_processor(self, schema: dict[str, Any] | None = None) -> LogitsProcessor: ...

    def regex_processor(self, pattern: str) -> LogitsProcessor: ...

    def resolve_adapter(self, ref: str) -> ResolvedAdapter: ...

    async def aresolve_adapter(self, ref: str) -> ResolvedAdapter: ...

    def load_adapter(self, ref: str, pin: bool = False) -> str: ...

    def pin_adapter(self, key: str, pinned: bool) -> None: ...

    def unload_adapter(self, ref: str) -> bool: ...

    def swap_adapter(self, name: str, version: str) -> str: ...

    def versions_in_use(self) -> set[str]: ...

    def stats(self) -> dict[str, Any]: ...

    def cancel(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...
