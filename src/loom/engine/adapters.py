"""The adapter cache: load resolved adapters off the decode path, LRU over slots and bytes,
pinning, preload, explicit unload, and a wait for a slot when every slot is in use.

Keys are concrete ``name@version`` refs; which version a bare name or alias means is the
resolver's business (``loom.engine.resolver``), so a hot-swap or an alias move changes where
*new* requests go while running requests keep the slot they started with (reference counts
keep it resident until they finish).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from loom.engine.resolver import AdapterResolver, ResolvedAdapter
from loom.engine.runner import ModelRunner
from loom.errors import CompatibilityError, IntegrityError, LoomError
from loom.store.facts import lora_module_of
from loom.store.hashing import sha256_bytes

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


def _read_checked(folder: Path, name: str, key: str, expected: dict[str, str] | None) -> bytes:
    """A file's bytes, checked against the manifest's sha256 in the same single read (about 1 ms
    per MB here): the engine must never serve weights that differ from what was published."""
    data = (folder / name).read_bytes()
    if expected is not None and name in expected and sha256_bytes(data) != expected[name]:
        raise IntegrityError(
            f"{key}: {name} does not match its manifest checksum (the stored copy is damaged); "
            f"run 'loom store verify {key}' and republish or restore it"
        )
    return data


def read_adapter(
    folder: Path, key: str, runner: ModelRunner, max_rank: int, expected: dict[str, str] | None = None
) -> AdapterWeights:
    """Read and check a PEFT LoRA folder against the runner's modules (any thread).
    ``expected``: file -> sha256 from the store manifest (None for a local folder)."""
    started = time.monotonic()
    cfg = json.loads(_read_checked(folder, "adapter_config.json", key, expected))
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CompatibilityError(f"{key}: peft_type {cfg.get('peft_type')} is not LORA")
    tensors = load_safetensors(_read_checked(folder, "adapter_model.safetensors", key, expected))
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        mapped = lora_module_of(name)
        if mapped is not None:
            pairs.setdefault(mapped[0].removesuffix(".weight"), {})[mapped[1]] = tensor
    weights: ModuleWeights = {}
    rank = nbytes = 0
    for module, ab in pairs.items():
        if module not in runner.lora_modules:
            targets = sorted({m.rsplit(".", 1)[-1] for m in runner.lora_modules})
            raise CompatibilityError(
                f"{key}: targets {module}, which this engine does not serve (engine LoRA targets: "
                f"{targets}); start the engine with lora_targets including it"
            )
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise CompatibilityError(f"{key}: {module} has only one of lora_A/lora_B")
        layer = runner.lora_modules[module]
        r = a.shape[0]
        if a.shape[1] != layer.in_features or b.shape != (layer.out_features, r):
            raise CompatibilityError(
                f"{key}: {module} has A {list(a.shape)} / B {list(b.shape)}, the base needs "
                f"[r, {layer.in_features}] / [{layer.out_features}, r]"
            )
        if r > max_rank:
            raise CompatibilityError(f"{key}: rank {r} exceeds the engine's max_rank {max_rank}")
        short = module.rsplit(".", 1)[-1]
        a_mod = alpha_pattern.get(module, alpha_pattern.get(short, alpha))
        scale = a_mod / (r**0.5 if rslora else r)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()  # as stored
        weights[module] = layer.prepare(a, b, scale)
        rank = max(rank, r)
    if not weights:
        raise CompatibilityError(f"{key}: no LoRA weights found in adapter_model.safetensors")
    return AdapterWeights(key, weights, nbytes, rank, time.monotonic() - started)


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
    def install(self, loaded: AdapterWeights, pinned: bool = False) -> Resident:
        with self.lock:
            self.loading.pop(loaded.key, None)
            if loaded.key in self.resident:  # installed meanwhile by the scheduler: keep a pin asked for
                self.resident[loaded.key].pinned |= pinned
                return self.resident[loaded.key]
            self._make_room(loaded.nbytes)
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

    def _make_room(self, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            raise LoomError(f"adapter needs {nbytes} bytes, more than the cache's {self.max_bytes}")
        while len(self.resident) >= self.max_slots or self.bytes + nbytes > self.max_bytes:
            idle = [r for r in self.resident.values() if r.refs == 0 and not r.pinned]
            if not idle:
                if any(r.refs and not r.pinned for r in self.resident.values()):
                    raise SlotsBusy(f"all {len(self.resident)} adapter slots serve running requests")
                raise LoomError(
                    f"adapter cache full: all {len(self.resident)} resident adapters are pinned; "
                    "unpin some (or start the server with more --max-loras)"
                )
            victim = min(idle, key=lambda r: r.last_used)
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
