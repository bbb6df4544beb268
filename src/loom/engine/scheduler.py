"""Continuous batching: requests join and leave the running batch at token boundaries.

One loop iteration: apply control messages (new requests, cancels, adapter
commands), install adapters that finished loading, admit waiting requests
first-come-first-served while slots and the token budget allow (a request
whose adapter is still loading is passed over, never blocking the others, and
keeps its place), prefill them, then one decode step for every running row.

Chunked prefill: a prompt longer than a step's prefill budget
(``max_prefill_tokens_per_step``) is prefilled a budget's worth per iteration,
between the decode steps of the running rows, as vLLM's chunked prefill does. Without
it one long prompt stalls every running stream for its whole prefill (seconds on a
CPU: about 2 ms per token on the default base); with it a decode step waits for at
most one chunk. Requests behind it in the queue wait for it to finish (first come,
first served).

A step is four parts with plain data between them, as in vLLM v1: this scheduler plans a
pass (``loom.engine.step``: rows, tokens, positions, each row's adapter slot), the runner
executes it, the sampler picks a token or an error per row (``loom.engine.sampling``), and
the output processor turns tokens into text, stops and chunks (``loom.engine.output``).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from loom.engine.adapters import AdapterCache, AdapterWeights, SlotsBusy
from loom.engine.kv_cache import KVCache
from loom.engine.output import OutputProcessor, fail_row, finish, finish_unstarted
from loom.engine.prefix_cache import PrefixCache, shared_prefix_len
from loom.engine.request import Request
from loom.engine.runner import ModelRunner
from loom.engine.sampling import RowSampling, sample_batch
from loom.engine.step import DecodePass, PrefillPass
from loom.engine.types import FinishReason
from loom.errors import IntegrityError, LoomError


@dataclass
class Limits:
    max_batch_size: int
    max_tokens_in_flight: int
    max_prefill_tokens_per_step: int


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        cache: KVCache,
        adapters: AdapterCache,
        limits: Limits,
        eos_ids: set[int],
        prefix: PrefixCache | None = None,
        remember_outputs: bool = True,
    ) -> None:
        """``remember_outputs``: a finished request's whole sequence (prompt and generated
        tokens) goes into the prefix cache, not only its prompt, so the next turn of a
        conversation (the history with this answer, then a new message) prefills only
        the new message."""
        self.runner, self.cache, self.adapters, self.limits = runner, cache, adapters, limits
        self.prefix = prefix or PrefixCache(0)
        self.remember_outputs = remember_outputs
        self.eos_ids = eos_ids
        self.output = OutputProcessor(eos_ids, cache.max_len)
        self.control: queue.Queue[Callable[[], None]] = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # row i uses cache slot i
        self.pending_loads: dict[str, Future[AdapterWeights]] = {}
        # adapters read and checked but waiting for a slot (all in use): key -> since when
        self.slot_waits: dict[str, float] = {}
        # A prompt being prefilled a chunk per iteration: (request, its KV slot, tokens in
        # the slot). Its slot is past every running row's (rows only leave while it fills).
        self.partial: tuple[Request, int, int] | None = None
        self.steps = 0
        self.oom_events = 0  # caught here (a failed chunk); the engine counts the rest

    # ------------------------------------------------------------------ loop
    def step(self, block: bool) -> bool:
        """One iteration; returns True when it did any model work."""
        self.drain_control(block and not self.running and not self.waiting and self.partial is None)
        self._install_loaded()
        worked = self._advance_partial() if self.partial is not None else self._admit()
        self._reap()  # a request can finish on its first token (eos, max_new_tokens=1)
        if not self.running:
            return worked
        self._decode()
        return True

    def drain_control(self, block: bool) -> None:
        try:
            fn = self.control.get(timeout=0.05) if block else self.control.get_nowait()
        except queue.Empty:
            return
        fn()
        while True:
            try:
                self.control.get_nowait()()
            except queue.Empty:
                return

    def add(self, req: Request) -> None:
        """Engine thread: queue a request (and its adapter load)."""
        if req.adapter_key is None:
            req.ready = True
        else:
            self.add_load(req)
        self.waiting.append(req)

    def cancel(self, request_id: str) -> None:
        for req in list(self.waiting):
            if req.id == request_id:
                self.waiting.remove(req)
                self._finish_waiting(req, "cancelled")
                return
        for req in self.running:
            if req.id == request_id:
                req.cancelled = True
        if self.partial is not None and self.partial[0].id == request_id:
            self.partial[0].cancelled = True

    def _install_loaded(self) -> None:
        # Oldest waiting request first, and no install evicts an adapter an *older* waiting
        # request needs (one installed this pass is idle until admitted): the oldest waiter
        # gets the freed slot, and younger ones cannot take it back.
        first_wait: dict[str, float] = {}
        for req in self.waiting:
            if req.adapter_key is not None:
                first_wait.setdefault(req.adapter_key, req.arrived)
        loads = sorted(self.pending_loads.items(), key=lambda kv: first_wait.get(kv[0], float("inf")))
        for key, fut in loads:
            if not fut.done():
                continue
            mine = first_wait.get(key, float("inf"))
            keep = frozenset(k for k, t in first_wait.items() if t < mine)
            if key in self.slot_waits and not any(r.adapter_key == key for r in self.waiting):
                # everyone who wanted it gave up (timeout, cancel): stop holding its weights
                del self.pending_loads[key], self.slot_waits[key]
                self.adapters.load_abandoned(key)
                continue
            error = None
            try:
                self.adapters.install(fut.result(), keep=keep)
            except SlotsBusy:
                # Every slot serves running requests: keep the weights and try again after
                # the next step releases one (the request's timeout bounds the wait).
                if key not in self.slot_waits:
                    self.slot_waits[key] = time.monotonic()
                    self.adapters.counters["slot_waits"] += 1
                continue
            except Exception as exc:  # a bad adapter fails its requests, never the engine
                self.adapters.load_failed(key)
                error = str(exc)
                # the caller's choice (incompatible, too big) vs. the server's store (damaged bytes, I/O)
                callers = isinstance(exc, LoomError) and not isinstance(exc, IntegrityError)
                kind = "adapter" if callers else "adapter_store"
            del self.pending_loads[key]
            self.slot_waits.pop(key, None)
            for req in list(self.waiting):
                if req.adapter_key == key:
                    if error is None:
                        req.ready = True
                    else:
                        req.error = f"adapter {key} failed to load: {error}"
                        req.meta["error_kind"] = kind
                        self.waiting.remove(req)
                        self._finish_waiting(req, "error")

    def _admit(self) -> bool:
        """Admit and prefill waiting requests; True when it ran the model."""
        in_flight = sum(r.budget_tokens for r in self.running)
        budget = self.limits.max_prefill_tokens_per_step
        tokens = 0  # prefill is padding-free: its size is the prompts' tokens
        admitted: list[Request] = []
        max_rows = min(self.limits.max_batch_size, self.cache.max_seqs)
        # While an adapter waits for a slot, later adapter requests do not take slots before it
        # (they would keep every slot busy for ever); base-only requests go on.
        slot_queue_head = self._oldest_slot_waiter()
        for req in list(self.waiting):
            if len(self.running) + len(admitted) >= max_rows:
                break
            if not req.ready:
                continue  # keeps its place; others proceed meanwhile
            if req.adapter_key is not None and req.arrived > slot_queue_head:
                continue
            if req.adapter_key is not None and req.adapter_key not in self.adapters.resident:
                # evicted while waiting (cache pressure): load it again
                req.ready = False
                self.add_load(req)
                continue
            if in_flight + req.budget_tokens > self.limits.max_tokens_in_flight and self.running:
                break  # FCFS: do not let later, smaller requests overtake
            need = len(req.prompt_ids)
            if admitted and tokens + need > budget:
                break
            self.waiting.remove(req)
            if need > budget:
                # Alone (admitted is empty), a chunk per iteration, after any cached prefix:
                # no prefill call ever computes more than the budget (the serve plan sizes
                # activations from it).
                self._start_partial(req)
                return True
            in_flight += req.budget_tokens
            tokens += need
            admitted.append(req)
        if admitted:
            self._prefill(admitted)
        return bool(admitted)

    def _oldest_slot_waiter(self) -> float:
        """Arrival of the oldest request whose adapter waits for a slot (inf: none)."""
        if not self.slot_waits:
            return float("inf")
        waiters = (r.arrived for r in self.waiting if r.adapter_key in self.slot_waits)
        return min(waiters, default=float("inf"))

    def add_load(self, req: Request) -> None:
        """Mark ``req`` ready if its adapter is resident, else start (or join) its load."""
        key = req.adapter_key
        assert key is not None
        fut = self.adapters.request_load(req.meta["adapter"])
        if fut is not None:
            self.pending_loads[key] = fut
        else:
            req.ready = True

    def _prefill(self, reqs: list[Request]) -> None:
        """One batched forward over all newly admitted prompts (better matmul shapes
        than one prompt at a time, and one wait instead of many for everyone's TTFT).
        Prompt prefixes already cached, or shared within this batch, are computed once."""
        for req in reqs:
            req.slot = self.adapters.acquire(req.adapter_key) if req.adapter_key else -1
        seeds = sorted(self._shared_prefixes(reqs), key=lambda seed: seed[0].slot)
        # Rows of one adapter side by side: the prefill computes LoRA per run of rows.
        reqs = sorted(reqs, key=lambda r: r.slot)
        first = len(self.running)
        self.running.extend(reqs)  # from here a failed step ends them (fail_running)
        try:
            logits = self._prefill_rows(reqs, first, seeds)
        except Exception as exc:  # this pass's rows end; the rows already running go on
            self.oom_events += isinstance(exc, torch.OutOfMemoryError)
            for req in reqs:
                fail_row(req, f"engine error: {exc}")
            self._reap()
            return
        self._sample_and_accept(reqs, logits)

    def _prefill_rows(
        self, reqs: list[Request], first: int, seeds: list[tuple[Request, int]]
    ) -> torch.Tensor:
        if seeds:
            # Each shared prefix once, into the first KV slots for the moment, then into the
            # prefix cache; every row then copies its prefix from the cache (or computes it).
            leaders = [req for req, _ in seeds]
            prefixes = [req.prompt_ids[:n] for req, n in seeds]
            self.runner.execute(self.cache, PrefillPass(first, prefixes, [req.slot for req in leaders]))
            for i, (req, tokens) in enumerate(zip(leaders, prefixes, strict=True)):
                self._remember(req, tokens, first + i)
        starts = [self._reuse_prefix(req, first + i) for i, req in enumerate(reqs)]
        prompts = [r.prompt_ids for r in reqs]
        logits = self.runner.execute(self.cache, PrefillPass(first, prompts, [r.slot for r in reqs], starts))
        for i, req in enumerate(reqs):
            self._remember(req, req.prompt_ids, first + i)
        return logits

    def _start_partial(self, req: Request) -> None:
        req.slot = self.adapters.acquire(req.adapter_key) if req.adapter_key else -1
        kv_slot = len(self.running)
        self.partial = (req, kv_slot, 0)  # from here a failing step finds and ends it
        self.partial = (req, kv_slot, self._reuse_prefix(req, kv_slot))
        self._advance_partial()

    def _advance_partial(self) -> bool:
        """Prefill the next chunk of the partial prompt; after the last one the request
        takes the next row of the running batch with its first token. True: model work."""
        assert self.partial is not None
        req, kv_slot, done = self.partial
        if req.cancelled:
            self.partial = None
            self._finish(req, "cancelled", "")
            return False
        n = len(req.prompt_ids)
        end = min(n, done + self.limits.max_prefill_tokens_per_step)
        try:
            chunk = PrefillPass(kv_slot, [req.prompt_ids[:end]], [req.slot], [done])
            logits = self.runner.execute(self.cache, chunk)
        except Exception as exc:  # its own failure (a chunk out of memory): the running rows go on
            self.oom_events += isinstance(exc, torch.OutOfMemoryError)
            self.partial = None
            req.error = f"engine error: {exc}"
            self._finish(req, "error", "")
            return True
        if end < n:
            self.partial = (req, kv_slot, end)
            return True
        row = len(self.running)  # running rows may have finished meanwhile: close the gap
        if kv_slot != row:
            self.cache.move(kv_slot, row, n)
        self.running.append(req)
        self.partial = None  # only now: had the move failed, fail_running would find it here
        self._remember(req, req.prompt_ids, row)
        self._sample_and_accept([req], logits)
        return True

    def _shared_prefixes(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        """Requests admitted together that share a prefix no cache entry holds yet (a burst
        of prompts with one system prompt): one (leader, prefix length) per group, so the
        prefix is prefilled once per adapter and everyone reuses it."""
        prefix = self.prefix
        if not prefix.enabled or len(reqs) < 2:
            return []
        groups: dict[tuple[str | None, tuple[int, ...]], list[Request]] = {}
        for req in reqs:
            owner = self._prefix_owner(req)
            if len(req.prompt_ids) > prefix.min_tokens and prefix.match(owner, req.prompt_ids, False)[1] == 0:
                key = (owner, tuple(req.prompt_ids[: prefix.min_tokens]))
                groups.setdefault(key, []).append(req)
        seeds: list[tuple[Request, int]] = []
        for members in groups.values():
            if len(members) < 2:
                continue
            shared = shared_prefix_len([m.prompt_ids for m in members])
            n = min(shared, *(len(m.prompt_ids) - 1 for m in members))
            if n >= prefix.min_tokens:
                seeds.append((members[0], n))
        return seeds

    def _prefix_owner(self, req: Request) -> str | None:
        """Whose K/V a prompt's prefix is: the base (None) or the adapter as loaded."""
        if req.adapter_key is None:
            return None
        return f"{req.adapter_key}#{self.adapters.resident[req.adapter_key].serial}"

    def _reuse_prefix(self, req: Request, slot: int) -> int:
        """Copy the longest cached prefix of ``req``'s prompt into its KV slot; return its length."""
        entry, n = self.prefix.match(self._prefix_owner(req), req.prompt_ids)
        if entry is None:
            return 0
        self.cache.k[:, slot, :, :n] = entry.k[:, :, :n]
        self.cache.v[:, slot, :, :n] = entry.v[:, :, :n]
        return n

    def _remember(self, req: Request, tokens: list[int], slot: int) -> None:
        n, owner = len(tokens), self._prefix_owner(req)
        self.prefix.insert(owner, tokens, self.cache.k[:, slot, :, :n], self.cache.v[:, slot, :, :n])

    def _decode(self) -> None:
        rows = self.running
        step = DecodePass([r.generated[-1] for r in rows], [r.position for r in rows], [r.slot for r in rows])
        logits = self.runner.execute(self.cache, step)
        self.steps += 1
        self._sample_and_accept(list(rows), logits)
        self._reap()

    def _sample_and_accept(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Choose every row's next token in one batched pass, then hand each to its request.
        A failure confined to one row (its processor raised, its logits are NaN, its text
        cannot be processed) ends that request alone; the other rows go on."""
        rows = [
            RowSampling(
                r.params,
                r.prompt_ids + r.generated if r.params.repetition_penalty != 1.0 else [],
                r.processor,
                r.generated,
                r.generator,
            )
            for r in reqs
        ]
        self.output.process(reqs, sample_batch(logits, rows))

    def _reap(self) -> None:
        """Finish done or cancelled rows; keep running rows in slots 0..n-1."""
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.cancelled:
                req.meta["finish"] = ("cancelled", req.decoder.text)
            if "finish" not in req.meta:
                i += 1
                continue
            reason, text = req.meta.pop("finish")
            if self.remember_outputs and reason in ("stop", "length"):
                # The slot holds K/V for the prompt and every generated token but the last
                # (sampled, never fed back).
                self._remember(req, req.prompt_ids + req.generated[:-1], i)
            self._finish(req, reason, text)
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move(last, i, moved.position + 1)
                self.running[i] = moved
            self.running.pop()

    def _finish(self, req: Request, reason: FinishReason, text: str) -> None:
        """Send ``req``'s final chunk and give back its adapter (it held a slot)."""
        finish(req, reason, text)
        if req.adapter_key:
            self.adapters.release(req.adapter_key)

    def fail_all(self, message: str) -> None:
        """On shutdown: nobody may wait forever for a request the engine will not run."""
        self.fail_running(message)
        while self.waiting:
            req = self.waiting.popleft()
            req.error = message
            self._finish_waiting(req, "error")

    def fail_running(self, message: str) -> None:
        """After an unexpected error in a step: end every running request with it."""
        if self.partial is not None:
            req = self.partial[0]
            self.partial = None
            req.error = message
            self._finish(req, "error", "")
        for req in self.running:
            fail_row(req, message)
        self._reap()

    def _finish_waiting(self, req: Request, reason: FinishReason) -> None:
        finish_unstarted(req, reason)

    @property
    def tokens_out(self) -> int:
        return self.output.tokens_out

    def stats(self) -> dict[str, Any]:
        partial = self.partial  # read once: other threads call stats() while it changes
        return {
            "queue_depth": len(self.waiting),
            "batch_size": len(self.running),
            "prefilling_tokens_left": len(partial[0].prompt_ids) - partial[2] if partial else 0,
            "tokens_in_flight": sum(r.budget_tokens for r in self.running)
            + (partial[0].budget_tokens if partial else 0),
            "steps": self.steps,
            "tokens_generated": self.tokens_out,
            "adapters_loading": len(self.pending_loads) - len(self.slot_waits),
            "adapters_waiting_for_slot": len(self.slot_waits),
            **self.prefix.stats(),
        }
