"""``VLLMEngine``: the serving surface of Loom's engine (``loom.engine.serving.ServingEngine``),
answered by a supervised vLLM child process.

Loom keeps what makes the store the source of truth: refs are resolved by Loom's own
``AdapterResolver`` (aliases followed within ``alias_refresh_s``, versions leased, base
fingerprints checked), and each concrete version is registered in vLLM under its key
``name@version`` through vLLM's runtime LoRA API. A promotion or hot-swap therefore loads a
new key and reroutes the name; requests already running finish on the version they started
with, and vLLM never restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from loom.engine.engine import EngineConfig, Prompt, checked_prompt, tokenize_prompt
from loom.engine.resolver import AdapterResolver, ResolvedAdapter, ResolvesAdapters
from loom.engine.types import Completion, LogitsProcessor, SamplingParams, StreamChunk
from loom.errors import LoomError
from loom.store.store import Store
from loom.vllm.metrics import Scraper
from loom.vllm.requests import GuidedDecoding, Tally, asse_events, completion_body, error_of
from loom.vllm.supervisor import Supervisor

log = logging.getLogger("loom.vllm")
ADMIN_TIMEOUT_S = 120.0


class VLLMEngine(ResolvesAdapters):
    def __init__(
        self,
        supervisor: Supervisor,
        tokenizer: Any,
        config: EngineConfig,
        *,
        store: Store | None,
        base_ref: str,
        base_fingerprint: str | None,
        vocab_size: int | None = None,
    ) -> None:
        self.supervisor, self.tokenizer, self.config = supervisor, tokenizer, config
        self.store, self.base_ref, self.base_fingerprint = store, base_ref, base_fingerprint
        self.max_len = config.max_seq_len  # vLLM's --max-model-len
        self.version_listeners: list[Callable[[str], None]] = []
        self.resolver = AdapterResolver(
            store, base_fingerprint, config.alias_refresh_s, on_resolved=self._on_resolved
        )
        self.loaded: dict[str, Path] = {}  # vLLM LoRA name (= Loom key) -> folder; re-added after a restart
        self.pinned: set[str] = set()
        self.counters = {"loads": 0, "load_failures": 0, "unloads": 0, "swaps": 0}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.http = httpx.Client(
            base_url=supervisor.url,
            timeout=httpx.Timeout(ADMIN_TIMEOUT_S, connect=5.0),
            headers=supervisor.auth,
        )
        # weak: a loop that is gone takes its client with it, and a new loop never reuses it
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self.in_flight: Counter[str] = Counter()  # requests per adapter key (unload waits for 0)
        supervisor.on_restarted = self.reload_all
        self.scraper = Scraper(supervisor.url, supervisor.auth)
        # the model's (embedding rows), which may exceed the tokenizer's own count
        self.vocab_size = vocab_size or len(tokenizer)

    def start(self, preload: list[str]) -> None:
        """Resolve ``preload`` through the store, start vLLM with them as --lora-modules (under
        their concrete keys), and block until it answers."""
        resolved = [self.resolve_adapter(ref) for ref in preload]
        self.supervisor.launch.lora_modules = {r.key: r.folder for r in resolved}
        self.supervisor.start()
        self.loaded.update(self.supervisor.launch.lora_modules)
        self.pinned.update(self.supervisor.launch.lora_modules)
        self.scraper.start()

    # ------------------------------------------------------------- prompts
    def tokenize(self, prompt: Prompt) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt, self.vocab_size)

    def _checked(self, prompt: Prompt, params: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        return checked_prompt(self.tokenize, prompt, params, self.max_len)

    def json_processor(self, schema: dict[str, Any] | None = None) -> LogitsProcessor:
        return GuidedDecoding("json", schema) if schema is not None else GuidedDecoding("json_object")

    def regex_processor(self, pattern: str) -> LogitsProcessor:
        return GuidedDecoding("regex", pattern)

    # ------------------------------------------------------------- generation
    async def stream(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Chunks as vLLM streams them; closing the iteration closes the connection, which
        aborts the request in vLLM."""
        ids, params = self._checked(prompt, params)
        key = await self._aready(adapter)
        if isinstance(key, Completion):  # the adapter could not be loaded: this request only
            yield StreamChunk(key.request_id, "", [], finished=True, completion=key)
            return
        try:
            tally = Tally(f"vllm-{next(self._ids)}", len(ids), key, time.monotonic())
            body = completion_body(key or self.base_ref, ids, params, _guided(logits_processor), stream=True)
            async with self._aclient().stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    done = tally.completion(*error_of(response))
                else:
                    async for event in asse_events(response.aiter_lines()):
                        for chunk in tally.add_event(event):
                            if chunk.text or chunk.token_ids:
                                yield chunk
                    done = tally.completion()
        except httpx.HTTPError as exc:
            done = tally.completion(*_unreachable(exc))
        finally:
            self._release(key)
        yield StreamChunk(tally.request_id, "", [], finished=True, completion=done)

    def complete(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        logits_processor: LogitsProcessor | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Blocking, non-streaming (agents' batches, warm-up); any thread."""
        ids, params = self._checked(prompt, params)
        key = self._ready_sync(adapter)
        if isinstance(key, Completion):
            return key
        try:
            tally = Tally(f"vllm-{next(self._ids)}", len(ids), key, time.monotonic())
            body = completion_body(key or self.base_ref, ids, params, _guided(logits_processor), stream=False)
            response = self.http.post("/v1/completions", json=body, timeout=timeout or ADMIN_TIMEOUT_S)
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.ReadTimeout):
                return tally.completion(f"vLLM did not finish within {timeout} s", "timeout")
            return tally.completion(*_unreachable(exc))
        finally:
            self._release(key)
        if response.status_code != 200:
            return tally.completion(*error_of(response))
        for choice in response.json().get("choices") or []:
            tally.add(choice)
        return tally.completion()

    def generate(self, prompt: Prompt, *, adapter: str | None = None, **kw: Any) -> Completion:
        return self.complete(prompt, adapter=adapter, **kw)

    def _aclient(self) -> httpx.AsyncClient:
        """One pooled client per event loop (a client is bound to the loop that made it)."""
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            timeout = httpx.Timeout(None, connect=5.0)  # the server's request timeout governs
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            client = self._aclients[loop] = httpx.AsyncClient(
                base_url=self.supervisor.url, timeout=timeout, limits=limits, headers=self.supervisor.auth
            )
        return client

    # ------------------------------------------------------------- adapters
    async def _aready(self, adapter: str | None) -> str | Completion | None:
        if adapter is None:
            return None
        resolved = await self.aresolve_adapter(adapter)
        if resolved.key in self.loaded:
            return self._hold(resolved.key)
        return await asyncio.to_thread(self._load_or_error, resolved)

    def _ready_sync(self, adapter: str | None) -> str | Completion | None:
        if adapter is None:
            return None
        resolved = self.resolve_adapter(adapter)
        return self._hold(resolved.key) if resolved.key in self.loaded else self._load_or_error(resolved)

    def _hold(self, key: str) -> str:
        with self._lock:
            self.in_flight[key] += 1
        return key

    def _release(self, key: str | None) -> None:
        if key is not None:
            with self._lock:
                self.in_flight[key] -= 1
                if self.in_flight[key] <= 0:
                    del self.in_flight[key]

    def _load_or_error(self, resolved: ResolvedAdapter) -> str | Completion:
        try:
            return self._hold(self.ensure_loaded(resolved))
        except LoomError as exc:
            tally = Tally(f"vllm-{next(self._ids)}", 0, resolved.key, time.monotonic())
            return tally.completion(str(exc), "adapter")

    def ensure_loaded(self, resolved: ResolvedAdapter) -> str:
        """Register ``resolved`` in vLLM (runtime LoRA API) unless it is; blocking."""
        key = resolved.key
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one registration per key, however many requests want it at once
            if key not in self.loaded:
                self._register(key, resolved.folder)
                self.loaded[key] = resolved.folder
                self.counters["loads"] += 1
        return key

    def _register(self, key: str, folder: Path) -> None:
        body = {"lora_name": key, "lora_path": str(folder)}
        try:
            response = self.http.post("/v1/load_lora_adapter", json=body)
        except httpx.HTTPError as exc:
            self.counters["load_failures"] += 1
            raise LoomError(f"adapter {key}: vLLM did not answer the load ({exc})") from None
        if response.status_code != 200 and "already been loaded" not in response.text:
            self.counters["load_failures"] += 1
            raise LoomError(f"adapter {key}: vLLM refused to load it: {error_of(response)[0]}")

    def reload_all(self) -> None:
        """After a vLLM restart: put back every adapter registered before it died."""
        for key, folder in list(self.loaded.items()):
            try:
                self._register(key, folder)
            except LoomError as exc:
                log.error("re-registering %s after a vLLM restart failed: %s", key, exc)
                self.loaded.pop(key, None)

    def load_adapter(self, ref: str, pin: bool = False) -> str:
        key = self.ensure_loaded(self.resolve_adapter(ref))
        if pin:
            self.pinned.add(key)
        return key

    def pin_adapter(self, key: str, pinned: bool) -> None:
        # vLLM keeps --max-cpu-loras adapters in its own LRU; Loom records the pin so the
        # pools API answers the same, and never unloads a pinned key.
        (self.pinned.add if pinned else self.pinned.discard)(key)

    def unload_adapter(self, ref: str) -> bool:
        """As Loom's engine: refused while requests run on it (they would fail in vLLM)."""
        key = self.unload_key(ref)
        if key not in self.loaded:
            return False
        with self._lock:
            if self.in_flight.get(key):
                raise LoomError(
                    f"adapter {key} has {self.in_flight[key]} requests running; unload it when they finish"
                )
        try:
            response = self.http.post("/v1/unload_lora_adapter", json={"lora_name": key})
        except httpx.HTTPError as exc:
            raise LoomError(f"adapter {key}: vLLM did not answer the unload ({exc})") from None
        if response.status_code != 200:
            raise LoomError(f"adapter {key}: vLLM refused to unload it: {error_of(response)[0]}")
        self.loaded.pop(key, None)
        self.pinned.discard(key)
        self.counters["unloads"] += 1
        return True

    def swap_adapter(self, name: str, version: str) -> str:
        """Hot-swap: register ``name@version`` in vLLM, then route new requests for ``name``."""
        key = self.load_adapter(f"{name}@{version}")
        self.resolver.route(name, key)
        self.counters["swaps"] += 1
        return key

    def versions_in_use(self) -> set[str]:
        """Leased in the store: routed to, resolved lately, pinned or running. A superseded
        version stays registered in vLLM (its weights fall out of vLLM's LRU) but is not held
        against gc."""
        with self._lock:
            running = set(self.in_flight)
        held = self.resolver.in_use() | self.pinned | running
        return {k for k in held if not k.startswith("path:")}

    def cancel(self, request_id: str) -> None:
        """Closing a stream aborts it in vLLM; there is nothing to cancel by id."""

    # ------------------------------------------------------------- status
    def stats(self) -> dict[str, Any]:
        gauges = self.scraper.values
        counters = {**self.counters, **self.resolver.counters}
        return {
            "backend": "vllm",
            "vllm": {
                "url": self.supervisor.url,
                "state": self.supervisor.state,
                "restarts": self.supervisor.restarts,
            },
            "queue_depth": int(gauges.get("vllm:num_requests_waiting", 0)),
            "batch_size": int(gauges.get("vllm:num_requests_running", 0)),
            # vLLM does not expose these; metrics.py reads every key, so they are zeros
            "prefilling_tokens_left": 0,
            "steps": 0,
            "tokens_generated": int(gauges.get("vllm:generation_tokens_total", 0)),
            "adapters_loading": 0,
            "adapters_waiting_for_slot": 0,
            "prefix_cache_hits": 0,
            "prefix_tokens_saved": 0,
            "prefix_cache_bytes": 0,
            "resident_adapters": sorted(self.loaded),
            "adapter_counters": counters,
            "oom_events": 0,
            "kv_cache_slots": self.config.max_batch_size,
            "max_seq_len": self.max_len,
            "device": self.supervisor.launch.device,
            "dtype": self.supervisor.launch.dtype,
            "base": self.base_ref,
        }

    def shutdown(self) -> None:
        self.scraper.stop()
        self.supervisor.stop()
        self.http.close()


def _unreachable(exc: httpx.HTTPError) -> tuple[str, str]:
    """vLLM gone (killed, restarting): the server answers 503 with Retry-After, never a 500."""
    return f"vLLM did not answer ({type(exc).__name__}: {exc}); it may be restarting", "backend_unavailable"


def _guided(processor: LogitsProcessor | None) -> GuidedDecoding | None:
    if processor is None or isinstance(processor, GuidedDecoding):
        return processor
    raise LoomError("the vLLM backend takes constraints as JSON schemas or regexes, not logits processors")
