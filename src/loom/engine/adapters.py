"""The adapter cache: load resolved adapters off the decode path, LRU over slots and bytes,
pinning, preload, explicit unload, and a wait for a slot when every slot is in use.

Keys are concrete ``name@version`` refs; which version a bare name or alias means is the
resolver's business (``loom.engine.resolver``), so a hot-swap or an alias move changes where
*new* requests go while running requests keep the slot they started with (reference counts
keep it resident until they finish).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.engine.resolver import AdapterResolver, ResolvedAdapter
from loom.engine.runner import ModelRunner
from loom.errors import CompatibilityError, LoomError
from loom.store.adapter_spec import AdapterSpec

# module -> (A, B) as LoRASlots.prepare lays them out: [in, r] and [r, out] with the scale in B
ModuleWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AdapterWeights:
    key: str
    weights: ModuleWeights
    nbytes: int
    rank: int
    load_seconds: float


@dataclass
class Resident:
    key: str
    slot: int
    nbytes: int
    rank: int
    serial: int = 0  # distinguishes installs of the same key (a local folder can change between them)
    pinned: bool = False
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)


def read_adapter(
    folder: Path, key: str, runner: ModelRunner, max_rank: int, expected: dict[str, str] | None = None
) -> AdapterWeights:
    """Read and check a PEFT LoRA folder against the runner's modules (any thread).
    ``expected``: file -> sha256 from the store manifest (None for a local folder), checked in the
    same read that loads the weights (``AdapterSpec.from_folder``)."""
    started = time.monotonic()
    spec = AdapterSpec.from_folder(folder, expected, where=key)
    weights: ModuleWeights = {}
    for module, lora in spec.modules.items():
        layer = runner.lora_modules.get(module)
        if layer is None:
            targets = sorted({m.rsplit(".", 1)[-1] for m in runner.lora_modules})
            raise CompatibilityError(
                f"{key}: targets {module}, which this engine does not serve (engine LoRA targets: "
                f"{targets}); start the engine with lora_targets including it"
            )
        if (lora.in_features, lora.out_features) != (layer.in_features, layer.out_features):
            raise CompatibilityError(
                f"{key}: {module} has A [{lora.rank}, {lora.in_features}] / B [{lora.out_features}, "
                f"{lora.rank}], the base needs [r, {layer.in_features}] / [{layer.out_features}, r]"
            )
        if lora.rank > max_rank:
            raise CompatibilityError(f"{key}: rank {lora.rank} exceeds the engine's max_rank {max_rank}")
        weights[module] = layer.prepare(*lora.tensors(), lora.scale)
    return AdapterWeights(key, weights, spec.nbytes, spec.rank, time.monotonic() - started)


class SlotsBusy(LoomError):
    """Every slot serves running requests: the adapter waits for one to be released."""


class AdapterCache:
    def __init__(
        self,
        runner: ModelRunner,
        resolver: AdapterResolver,
        max_slots: int,
        max_bytes: int,
        max_rank: int,
    ) -> None:
        self.runner, self.resolver = runner, resolver
        self.max_slots, self.max_bytes, self.max_rank = max_slots, max_bytes, max_rank
        self.resident: dict[str, Resident] = {}
        self.loading: dict[str, Future[AdapterWeights]] = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loom-adapter-load")
        self.lock = threading.Lock()
        self.counters = {"loads": 0, "load_failures": 0, "evictions": 0, "swaps": 0, "slot_waits": 0}
        self.load_seconds: list[float] = []

    def request_load(self, adapter: ResolvedAdapter) -> Future[AdapterWeights] | None:
        """Start reading a resolved adapter in the background unless resident or already loading."""
        key = adapter.key
        with self.lock:
            if key in self.resident:
                return None
            fut = self.loading.get(key)
            if fut is None:
                fut = self.pool.submit(
                    read_adapter, adapter.folder, key, self.runner, self.max_rank, adapter.checksums
                )
                self.loading[key] = fut
            return fut

    def load_failed(self, key: str) -> None:
        """Forget a failed read so a later request can try again, and count it."""
        with self.lock:
            self.loading.pop(key, None)
            self.counters["load_failures"] += 1

    def load_abandoned(self, key: str) -> None:
        """Forget a read nobody waits for any more (a later request reads it again)."""
        with self.lock:
            self.loading.pop(key, None)

    # -- installation (engine thread only: slots change between steps) -------
    def install(
        self, loaded: AdapterWeights, pinned: bool = False, keep: frozenset[str] = frozenset()
    ) -> Resident:
        """Put ``loaded`` in a slot, evicting idle adapters not in ``keep`` (those waiting
        requests need). Raises SlotsBusy, leaving the load registered, when none is free."""
        with self.lock:
            if loaded.key in self.resident:  # installed meanwhile by the scheduler: keep a pin asked for
                self.loading.pop(loaded.key, None)
                self.resident[loaded.key].pinned |= pinned
                return self.resident[loaded.key]
            self._make_room(loaded.nbytes, keep)
            self.loading.pop(loaded.key, None)
            used = {r.slot for r in self.resident.values()}
            slot = next(s for s in range(self.max_slots) if s not in used)
            for module, (a_t, b_s) in loaded.weights.items():
                self.runner.lora_modules[module].install(slot, a_t, b_s)
            serial = self.counters["loads"]
            entry = Resident(loaded.key, slot, loaded.nbytes, loaded.rank, serial=serial, pinned=pinned)
            self.resident[loaded.key] = entry
            self.counters["loads"] += 1
            self.load_seconds.append(loaded.load_seconds)
            return entry

    def _make_room(self, nbytes: int, keep: frozenset[str] = frozenset()) -> None:
        """Evict least-recently-used idle adapters until ``nbytes`` fits in a free slot; evicts
        nothing unless those evictions together make room (a failed install costs no residents)."""
        if nbytes > self.max_bytes:
            raise LoomError(f"adapter needs {nbytes} bytes, more than the cache's {self.max_bytes}")
        slots, used = len(self.resident), self.bytes
        idle = [r for r in self.resident.values() if r.refs == 0 and not r.pinned and r.key not in keep]
        victims = []
        for victim in sorted(idle, key=lambda r: r.last_used):
            if slots < self.max_slots and used + nbytes <= self.max_bytes:
                break
            victims.append(victim)
            slots, used = slots - 1, used - victim.nbytes
        if slots >= self.max_slots or used + nbytes > self.max_bytes:
            if any((r.refs or r.key in keep) and not r.pinned for r in self.resident.values()):
                raise SlotsBusy(f"all {len(self.resident)} adapter slots serve running requests")
            raise LoomError(
                f"adapter cache full: all {len(self.resident)} resident adapters are pinned; "
                "unpin some (or start the server with more --max-loras)"
            )
        for victim in victims:
            self._evict(victim)

    def _evict(self, entry: Resident) -> None:
        for module in self.runner.lora_modules.values():
            module.clear_slot(entry.slot)  # stale weights must never leak into a base-only row
        del self.resident[entry.key]
        self.counters["evictions"] += 1

    def unload(self, key: str) -> bool:
        with self.lock:
            entry = self.resident.get(key)
            if entry is None:
                return False
            if entry.refs:
                raise LoomError(
                    f"{key} is serving {entry.refs} running requests; unload it after they finish"
                )
            self._evict(entry)
            self.counters["evictions"] -= 1  # an explicit unload is not an eviction
            return True

    def acquire(self, key: str) -> int:
        with self.lock:
            entry = self.resident[key]
            entry.refs += 1
            entry.last_used = time.monotonic()
            return entry.slot

    def release(self, key: str) -> None:
        with self.lock:
            entry = self.resident.get(key)
            if entry is not None:
                entry.refs -= 1

    def route(self, name: str, key: str) -> None:
        self.resolver.route(name, key)
        with self.lock:
            self.counters["swaps"] += 1

    @property
    def bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())
