"""A safetensors file read one tensor at a time with plain reads, never memory-mapped.

``safetensors.safe_open`` maps the whole file: every page a ``get_tensor`` touches stays
mapped, and counted in the process's RSS, until the handle closes, on top of the copy it
returns. Reading a 7.4 GB int8 variant that way held the file's pages beside the tensors
made from them (see BENCHMARKS.md, issue 18). Here each tensor is read with ``readinto``
straight into its own storage: the process holds the tensors it keeps and nothing else
(the kernel's page cache is not the process's and is given back under pressure).

The format: 8 bytes little-endian header length, a JSON header mapping each name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data after the
header) plus an optional ``__metadata__``, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from types import TracebackType

import torch

from loom.errors import IntegrityError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets in the file
    end: int


class TensorFile:
    """``with TensorFile(path) as f: f.get_tensor(name)``; ``names()`` in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fh: FileIO = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        try:
            self.entries, self.metadata = _header(self._fh, self.path)
        except BaseException:
            self._fh.close()
            raise

    def names(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        view = raw.numpy().data  # the tensor's own bytes, written in place
        self._fh.seek(entry.begin)
        done = 0
        while done < len(view):  # one read returns at most 0x7ffff000 bytes on Linux
            n = self._fh.readinto(view[done:])
            if not n:
                raise IntegrityError(f"{self.path}: {name} is cut short ({done} of {len(view)} bytes)")
            done += n
        return raw.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _header(fh: FileIO, path: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors' entries in file order, each checked against the file's size."""
    size = fh.seek(0, 2)
    fh.seek(0)
    length = struct.unpack("<Q", fh.read(8))[0] if size >= 8 else -1
    if not 0 <= length <= min(MAX_HEADER, size - 8):
        raise IntegrityError(f"{path}: not a safetensors file (header length {length}, file {size} bytes)")
    try:
        header = json.loads(fh.read(length))
    except ValueError as exc:
        raise IntegrityError(f"{path}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    try:
        raw = {name: _entry(info) for name, info in header.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{path}: safetensors header entry is malformed ({exc})") from None
    entries: dict[str, Entry] = {}
    expected_begin = 0  # the format lays tensors end to end from the start of the data
    for name, (dtype, shape, begin, end) in sorted(raw.items(), key=lambda kv: kv[1][2]):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin != expected_begin or end - begin != nbytes or start + end > size:
            raise IntegrityError(
                f"{path}: {name} spans bytes {begin}..{end}, which does not hold its {dtype} "
                f"{list(shape)} right after the previous tensor within the file's {size - start} data bytes"
            )
        entries[name] = Entry(dtype, shape, start + begin, start + end)
        expected_begin = end
    if start + expected_begin != size:
        raise IntegrityError(f"{path}: {size - start - expected_begin} bytes after the last tensor")
    return entries, metadata


def _entry(info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry, checked: a known dtype, non-negative integer dims and offsets."""
    if not isinstance(info, dict):
        raise TypeError(f"entry {info!r} is not an object")
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"dtype {info['dtype']} is not one Loom reads")
    shape, offsets = info["shape"], info["data_offsets"]
    values = [*shape, *offsets]
    if len(offsets) != 2 or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"shape {shape} / data_offsets {offsets} are not non-negative integers")
    return dtype, tuple(shape), offsets[0], offsets[1]
