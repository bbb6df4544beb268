"""The engine: one resident base, many adapters, continuous batching. No HTTP here.

    engine = Engine.from_store("smollm2-135m-instruct")
    done = engine.generate("Hello", adapter="intent-lora")           # blocking
    async for chunk in engine.stream(messages, adapter="support@v3"):  # streaming
        ...

A background thread owns the model and runs the scheduler; callers talk to it
through a control queue, so the public methods are safe from any thread or
event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from loom.engine.adapters import AdapterCache
from loom.engine.detok import IncrementalDecoder
from loom.engine.prefix_cache import PrefixCache
from loom.engine.request import Request, Sink
from loom.engine.resolver import DEFAULT_REFRESH_S, AdapterResolver, ResolvesAdapters
from loom.engine.runner import ATTN_TARGETS, ModelRunner
from loom.engine.scheduler import Limits, Scheduler
from loom.engine.types import Completion, LogitsProcessor, SamplingParams, StreamChunk
from loom.errors import LoomError
from loom.store.store import Store

Prompt = str | list[dict[str, str]] | list[int]


@dataclass
class EngineConfig:
    max_batch_size: int = 32
    max_seq_len: int = 512
    kv_cache_mb: int = 1024
    max_tokens_in_flight: int | None = None  # default: what the KV cache holds
    # prompt tokens prefilled per step; a longer prompt is prefilled in chunks of this many
    # between decode steps (the running rows wait for one chunk, not the whole prompt)
    max_prefill_tokens_per_step: int = 4096
    max_adapters: int = 32  # resident slots
    adapter_cache_mb: int = 512
    max_rank: int = 16
    lora_targets: tuple[str, ...] = ATTN_TARGETS
    prefix_cache_mb: int = 256  # K/V of recent prompts kept for prefix reuse; 0 turns reuse off
    # finished requests' whole sequences (prompt + output) kept too: a chat's next turn reuses
    # its history; False keeps prompts only
    prefix_cache_outputs: bool = True
    # on CPU: weights held oneDNN-packed (loom.engine.linear: fp32, and bf16 where the CPU has
    # native bf16); False keeps torch's plain GEMMs
    pack_weights: bool = True
    # how old a bare name's or alias's route may get before the store is read again: the
    # longest an alias move (promotion, rollback) takes to reach new requests
    alias_refresh_s: float = DEFAULT_REFRESH_S

    def __post_init__(self) -> None:
        if self.max_prefill_tokens_per_step < 1:
            raise LoomError(
                f"max_prefill_tokens_per_step {self.max_prefill_tokens_per_step}: give a positive "
                "number of tokens"
            )


class Engine(ResolvesAdapters):
    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        config: EngineConfig | None = None,
        store: Store | None = None,
        base_ref: str | None = None,
        base_fingerprint: str | None = None,
        loader: Callable[[], tuple[Any, Any, str | None, str | None]] | None = None,
    ) -> None:
        """Start the engine on ``model``/``tokenizer``, or on what ``loader()`` returns
        (model, tokenizer, base ref, base fingerprint), loaded on the engine thread."""
        self.config = config or EngineConfig()
        self.store = store
        self.base_ref, self.base_fingerprint = base_ref, base_fingerprint
        self._ids = itertools.count()
        # told of every concrete adapter version before its files are fetched (leases); one that
        # raises a LoomError refuses the version (the server's LoRA limits), and the request fails
        self.version_listeners: list[Callable[[str], None]] = []
        self.oom_events = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        # All tensor work happens on this one thread. Two threads running torch ops
        # give OpenMP two thread teams fighting over the cores: we measured decode
        # steps 1.7x slower on the 2-core machine when loading ran on the caller's thread.
        self._thread = threading.Thread(
            target=self._main, args=(model, tokenizer, loader), name="loom-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error

    def _build(self, model: Any, tokenizer: Any) -> None:
        cfg = self.config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(
            model, cfg.max_adapters, cfg.max_rank, cfg.lora_targets, pack_weights=cfg.pack_weights
        )
        self.cache = self.runner.new_cache(cfg.kv_cache_mb * 2**20, cfg.max_seq_len, cfg.max_batch_size)
        self.resolver = AdapterResolver(
            self.store, self.base_fingerprint, cfg.alias_refresh_s, on_resolved=self._on_resolved
        )
        self.adapters = AdapterCache(
            self.runner, self.resolver, cfg.max_adapters, cfg.adapter_cache_mb * 2**20, cfg.max_rank
        )
        limits = Limits(
            max_batch_size=cfg.max_batch_size,
            max_tokens_in_flight=cfg.max_tokens_in_flight or self.cache.max_seqs * cfg.max_seq_len,
            max_prefill_tokens_per_step=cfg.max_prefill_tokens_per_step,
        )
        prefix = PrefixCache(cfg.prefix_cache_mb * 2**20)
        eos = _eos_ids(model, tokenizer)
        self.scheduler = Scheduler(
            self.runner, self.cache, self.adapters, limits, eos, prefix, cfg.prefix_cache_outputs
        )

    def _main(self, model: Any, tokenizer: Any, loader: Any) -> None:
        try:
            if loader is not None:
                model, tokenizer, self.base_ref, self.base_fingerprint = loader()
            self._build(model, tokenizer)
        except BaseException as exc:
            self._init_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    @classmethod
    def from_store(
        cls,
        base_ref: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        store: Store | None = None,
        preload: list[str] | None = None,
        **config: Any,
    ) -> Engine:
        """Load the base (verified) from the store and start the engine."""
        from loom.models.loading import load_model

        store = store or Store()

        def load() -> tuple[Any, Any, str | None, str | None]:
            loaded = load_model(base_ref, store=store, device=device, dtype=dtype)
            base = loaded.plan.base
            fingerprint = base.manifest.base.fingerprint if base and base.manifest.base else None
            return loaded.model, loaded.tokenizer, loaded.plan.base_ref, fingerprint

        engine = cls(config=EngineConfig(**config), store=store, loader=load)
        for ref in preload or []:
            engine.load_adapter(ref, pin=True)
        return engine

    @property
    def max_len(self) -> int:
        """Prompt + generated tokens one request may hold (the KV cache's slot length)."""
        return int(self.cache.max_len)

    # ------------------------------------------------------------- requests
    def tokenize(self, prompt: Prompt) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt, self.runner.vocab_size)

    def submit(
        self,
        prompt: Prompt,
        *,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        logits_processor: LogitsProcessor | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        request_id: str | None = None,
        enqueue: bool = True,
    ) -> Request:
        """Queue a request; its chunks arrive on ``request.sink``. Raises on bad input.
        ``enqueue=False`` only builds it (``generate_many`` queues a burst in one go)."""
        ids, params = checked_prompt(self.tokenize, prompt, params, self.max_len)
        resolved = self.resolve_adapter(adapter) if adapter else None
        req = Request(
            id=request_id or f"req-{next(self._ids)}",
            prompt_ids=ids,
            params=params,
            adapter_ref=adapter,
            adapter_key=resolved.key if resolved else None,
            sink=Sink(loop),
            decoder=IncrementalDecoder(self.tokenizer),
            processor=logits_processor,
        )
        if params.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        if resolved is not None:
            req.meta["adapter"] = resolved
        if enqueue:
            self.scheduler.control.put(lambda: self.scheduler.add(req))
        return req

    def generate(self, prompt: Prompt, *, adapter: str | None = None, **kw: Any) -> Completion:
        """Blocking: submit and wait for the completion."""
        return self._wait(self.submit(prompt, adapter=adapter, **kw))

    def generate_many(self, prompts: list[tuple[Prompt, str | None]], **kw: Any) -> list[Completion]:
        """Blocking: submit all (prompt, adapter) pairs at once, so they batch together.
        They reach the engine as one burst: none starts before all are queued."""
        reqs = [self.submit(p, adapter=a, enqueue=False, **kw) for p, a in prompts]

        def add_all() -> None:
            for req in reqs:
                self.scheduler.add(req)

        self.scheduler.control.put(add_all)
        return [self._wait(req) for req in reqs]

    @staticmethod
    def _wait(req: Request) -> Completion:
        """Block until ``req`` (submitted without an event loop) finishes."""
        while True:
            chunk = req.sink.squeue.get()
            if chunk.finished and chunk.completion is not None:
                return chunk.completion

    async def stream(
        self, prompt: Prompt, *, adapter: str | None = None, **kw: Any
    ) -> AsyncIterator[StreamChunk]:
        """Async iterator of text chunks; cancelling the iteration cancels the request.
        Store I/O for the adapter (alias refresh, download) runs on a worker thread."""
        if adapter is not None:
            adapter = (await self.aresolve_adapter(adapter)).key
        req = self.submit(prompt, adapter=adapter, loop=asyncio.get_running_loop(), **kw)
        assert req.sink.aqueue is not None
        finished = False
        try:
            while not finished:
                chunk = await req.sink.aqueue.get()
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:  # the consumer stopped early (disconnect, break, cancel)
                self.cancel(req.id)

    async def agenerate(self, prompt: Prompt, *, adapter: str | None = None, **kw: Any) -> Completion:
        async for chunk in self.stream(prompt, adapter=adapter, **kw):
            if chunk.finished and chunk.completion is not None:
                return chunk.completion
        raise LoomError("stream ended without a completion")

    def cancel(self, request_id: str) -> None:
        self.scheduler.control.put(lambda: self.scheduler.cancel(request_id))

    def json_processor(self, schema: dict[str, Any] | None = None) -> LogitsProcessor:
        """A per-request processor forcing JSON (matching ``schema`` when given)."""
        from loom.engine.constrained import GrammarProcessor

        return GrammarProcessor.json_schema(self.tokenizer, schema, self.runner.vocab_size)

    def regex_processor(self, pattern: str) -> LogitsProcessor:
        from loom.engine.constrained import GrammarProcessor

        return GrammarProcessor.regex(self.tokenizer, pattern, self.runner.vocab_size)

    # ------------------------------------------------------------- adapters
    def _on_engine_thread(self, fn: Any, timeout: float = 120.0) -> Any:
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except Exception as exc:
                box["error"] = exc
            done.set()

        self.scheduler.control.put(run)
        if not done.wait(timeout):
            raise LoomError(f"the engine did not answer within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def versions_in_use(self) -> set[str]:
        """Adapter versions resident, loading, waiting for a slot or routed to (for leases)."""
        with self.adapters.lock:
            held = set(self.adapters.resident) | set(self.adapters.loading)
        held |= {k for k in list(self.scheduler.pending_loads) if k}
        held |= {r.adapter_key for r in list(self.scheduler.waiting) if r.adapter_key}
        return {k for k in held | self.resolver.in_use() if not k.startswith("path:")}

    def load_adapter(self, ref: str, pin: bool = False) -> str:
        """Load (blocking) and return the concrete key ``name@version``."""
        resolved = self.resolve_adapter(ref)
        key = resolved.key
        fut = self.adapters.request_load(resolved)  # shares a read already under way
        if fut is not None:
            try:
                weights = fut.result()
            except Exception:
                self.adapters.load_failed(key)
                raise
            self._on_engine_thread(lambda: self.adapters.install(weights, pinned=pin))
        elif pin:
            self.adapters.resident[key].pinned = True
        return key

    def pin_adapter(self, key: str, pinned: bool) -> None:
        """Pin (never evicted) or unpin a resident ``name@version``."""

        def apply() -> None:
            entry = self.adapters.resident.get(key)
            if entry is not None:
                entry.pinned = pinned

        self._on_engine_thread(apply)

    def unload_adapter(self, ref: str) -> bool:
        key = self.unload_key(ref)
        return bool(self._on_engine_thread(lambda: self.adapters.unload(key)))

    def swap_adapter(self, name: str, version: str) -> str:
        """Hot-swap: load ``name@version``, then route new requests for ``name`` to it.

        Requests already running finish on the version they started with."""
        key = self.load_adapter(f"{name}@{version}")
        self.adapters.route(name, key)
        return key

    # ------------------------------------------------------------- status
    def stats(self) -> dict[str, Any]:
        s = self.scheduler.stats()
        with self.adapters.lock:  # other threads may read while the engine thread installs
            resident, counters = sorted(self.adapters.resident), dict(self.adapters.counters)
            counters.update(self.resolver.counters)
            adapter_bytes = sum(r.nbytes for r in self.adapters.resident.values())
        s.update(
            resident_adapters=resident,
            adapter_counters=counters,
            oom_events=self.oom_events + self.scheduler.oom_events,
            adapter_bytes=adapter_bytes,
            kv_cache_bytes=self.cache.nbytes,
            packed_weights=self.runner.head.packed is not None,
            # a packed lm_head whose dense weight the input embeddings share is a second copy
            packed_head_copy_bytes=self.runner.tied_head_copy,
            kv_cache_slots=self.cache.max_seqs,
            max_seq_len=self.cache.max_len,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            base=self.base_ref,
        )
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scheduler.step(block=True)
            except Exception as exc:  # keep serving: fail the running batch, not the engine
                if isinstance(exc, torch.OutOfMemoryError):
                    self.oom_events += 1
                self.scheduler.fail_running(f"engine error: {exc}")
                time.sleep(0.01)
        self.scheduler.drain_control(block=False)  # requests submitted before shutdown
        self.scheduler.fail_all("the engine was shut down")

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def checked_prompt(
    tokenize: Callable[[Prompt], list[int]], prompt: Prompt, params: SamplingParams | None, max_len: int
) -> tuple[list[int], SamplingParams]:
    """A request's ids and checked sampling parameters, or the error naming what to change."""
    params = params or SamplingParams()
    params.validate()
    ids = tokenize(prompt)
    if len(ids) + params.max_new_tokens > max_len:
        raise LoomError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"engine's max_seq_len {max_len}; shorten the prompt or lower max_new_tokens"
        )
    return ids, params


def tokenize_prompt(tokenizer: Any, prompt: Prompt, vocab_size: int) -> list[int]:
    """Prompt ids: text as is, chat messages through the base's chat template, ids checked.
    Every backend tokenizes here, so a prompt is the same tokens whichever engine answers."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    elif prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = list(prompt)
        bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < vocab_size), None)
        if bad is not None:  # an out-of-range id would fail the whole batch in the embedding lookup
            raise LoomError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}); send valid ids")
    if not ids:
        raise LoomError("empty prompt: give some text, chat messages or token ids")
    return [int(i) for i in ids]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
