"""The adapter cache: load from the store off the decode path, LRU over slots and bytes,
pinning, preload, explicit unload and hot-swap by version.

Keys are concrete ``name@version`` refs. A bare name routes to a version
(resolved once from the store's ``current`` alias, or set by ``swap``), so a
hot-swap changes where *new* requests go while running requests keep the slot
they started with (reference counts keep it resident until they finish).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.engine.runner import ModelRunner
from loom.errors import CompatibilityError, LoomError
from loom.models.loading import materialize, resolve_adapter
from loom.refs import parse_ref
from loom.store.adapter_spec import AdapterSpec
from loom.store.store import Store

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


class AdapterCache:
    def __init__(
        self,
        runner: ModelRunner,
        store: Store | None,
        base_fingerprint: str | None,
        max_slots: int,
        max_bytes: int,
        max_rank: int,
    ) -> None:
        self.runner, self.store, self.fingerprint = runner, store, base_fingerprint
        self.max_slots, self.max_bytes, self.max_rank = max_slots, max_bytes, max_rank
        self.resident: dict[str, Resident] = {}
        self.routes: dict[str, str] = {}  # bare name -> name@version for new requests
        self.loading: dict[str, Future[AdapterWeights]] = {}
        self.checksums: dict[str, dict[str, str]] = {}  # name@version -> file -> sha256
        self.folders: dict[str, Path] = {}  # name@version -> local folder, once resolved
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loom-adapter-load")
        self.lock = threading.Lock()
        self.counters = {"loads": 0, "load_failures": 0, "evictions": 0, "swaps": 0}
        self.load_seconds: list[float] = []

    # -- resolution (caller threads) ------------------------------------------
    def resolve(self, ref: str) -> tuple[str, Path]:
        """``ref`` -> (``name@version``, local folder), checking kind and base fingerprint."""
        parsed = parse_ref(ref)
        if parsed.kind == "path":
            folder = Path(parsed.name)
            if not (folder / "adapter_config.json").is_file():
                raise LoomError(f"adapter {ref}: no adapter_config.json in that folder")
            return f"path:{folder.resolve()}", folder
        if parsed.kind != "store":
            raise LoomError(f"adapter {ref}: give a store ref (name or name@version) or a local folder")
        if self.store is None:
            raise LoomError(f"adapter {ref}: this engine has no store; pass a local adapter folder")
        with self.lock:
            routed = self.routes.get(parsed.name) if parsed.selector is None else None
            known = routed or (ref if parsed.selector is not None else None)
            if known in self.resident and known in self.folders:
                # a version is immutable and was kind- and fingerprint-checked when it was loaded:
                # requests for a resident adapter need no store lookup (the hot path)
                return known, self.folders[known]
        resolved = resolve_adapter(self.store, routed or ref, self.fingerprint, "the base this engine serves")
        with self.lock:
            if parsed.selector is None and routed is None:
                self.routes.setdefault(parsed.name, resolved.ref)
            self.checksums[resolved.ref] = {f.path: f.sha256 for f in resolved.manifest.files}
        folder = materialize(self.store, resolved)
        with self.lock:
            self.folders[resolved.ref] = folder
        return resolved.ref, folder

    def request_load(self, key: str, folder: Path) -> Future[AdapterWeights] | None:
        """Start reading ``key`` in the background unless resident or already loading."""
        with self.lock:
            if key in self.resident:
                return None
            fut = self.loading.get(key)
            if fut is None:
                expected = self.checksums.get(key)
                fut = self.pool.submit(read_adapter, folder, key, self.runner, self.max_rank, expected)
                self.loading[key] = fut
            return fut

    def load_failed(self, key: str) -> None:
        """Forget a failed read so a later request can try again, and count it."""
        with self.lock:
            self.loading.pop(key, None)
            self.counters["load_failures"] += 1

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
                raise LoomError(
                    f"adapter cache full: {len(self.resident)} adapters resident, all pinned or in use; "
                    f"raise max_adapters or unpin some"
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
        with self.lock:
            self.routes[name] = key
            self.counters["swaps"] += 1

    @property
    def bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())
