"""What every export shares: resolving refs to verified local folders, and writing output files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loom.errors import LoomError
from loom.models.loading import plan_load
from loom.store.store import Resolved, Store


@dataclass
class ExportResult:
    """What an export wrote: the files, the store refs read, and notes for the user."""

    files: list[str]
    sources: list[str]
    notes: list[str] = field(default_factory=list)


def resolve_base(store: Store, ref: str, command: str) -> tuple[Resolved, Path]:
    """A base (or merged base) version and its verified local folder; other kinds are refused
    with the command that does take them."""
    resolved = store.resolve(ref)
    kind = resolved.manifest.kind
    if kind == "adapter":
        raise LoomError(
            f"{resolved.ref} is an adapter, and 'loom export {command}' takes a base model: merge it "
            f"first with 'loom export merged {resolved.ref} --name NAME', or export the adapter "
            f"itself with 'loom export gguf-lora {resolved.ref} -o FILE'"
        )
    if kind != "base":
        raise LoomError(
            f"{resolved.ref} is a {kind} snapshot, not a model; 'loom export {command}' takes a base "
            f"model ref (see 'loom store ls --kind base')"
        )
    plan = plan_load(resolved.ref, store=store)
    return resolved, Path(plan.base_path)


def resolve_adapter(store: Store, ref: str, command: str) -> tuple[Resolved, Path, Resolved, Path]:
    """An adapter version, its verified folder, and its base's (checked to be the one it fits)."""
    resolved = store.resolve(ref)
    info = resolved.manifest.adapter
    if resolved.manifest.kind != "adapter" or info is None:
        raise LoomError(
            f"{resolved.ref} is a {resolved.manifest.kind}, and 'loom export {command}' takes an "
            f"adapter ref (see 'loom store ls --kind adapter')"
        )
    plan = plan_load(info.base_ref, [resolved.ref], store=store)
    assert plan.base is not None  # an adapter's base_ref is always a store ref
    return resolved, Path(plan.adapter_paths[0]), plan.base, Path(plan.base_path)


def check_output_file(out: Path, suffix: str, force: bool) -> Path:
    """The output path, refused when its folder is missing or it exists (without ``force``)."""
    out = out.expanduser()
    if not out.parent.is_dir():
        raise LoomError(
            f"{out}: the folder {out.parent} does not exist; create it (mkdir -p {out.parent}) "
            f"or write elsewhere"
        )
    if out.is_dir():
        raise LoomError(f"{out} is a folder; give a file name ending in {suffix}")
    if out.suffix.lower() != suffix:
        raise LoomError(f"{out}: the output file name must end in {suffix} (e.g. {out.stem}{suffix})")
    if out.exists() and not force:
        raise LoomError(f"{out} already exists; pass --force to overwrite it, or choose another name")
    return out


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` that becomes ``out`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
