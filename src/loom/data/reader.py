"""Read JSON/JSONL files (globs, several files) or a ``datasets`` dataset into Examples."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.data.formats import Example, RowError, RowFormat, Templates, to_example
from loom.errors import LoomError, OfflineError


@dataclass
class ReadReport:
    examples: list[Example] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    rows_read: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per skipped row

    @property
    def rows_used(self) -> int:
        return len(self.examples)


def expand_files(patterns: list[str]) -> list[Path]:
    """Expand globs; every pattern must match at least one file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise LoomError(f"--train-files/--eval-files: {pattern!r} matches no file; check the path")
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def _rows_of(path: Path) -> list[tuple[str, Any | Exception]]:
    """(line-location, parsed value or the JSON error) for each non-blank row."""
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{path}:item {i}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as exc:
            return [(f"{path}:{exc.lineno}", exc)]
    out: list[tuple[str, Any | Exception]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((f"{path}:{n}", exc))
    return out


def read_rows(
    files: list[str] | None = None,
    *,
    dataset_name: str | None = None,
    fmt: RowFormat = RowFormat.auto,
    templates: Templates | None = None,
    skip_bad_rows: bool = False,
    max_rows: int | None = None,
    label_field: str = "label",
) -> ReadReport:
    templates = templates or Templates()
    report = ReadReport()
    if dataset_name:
        source_rows = _dataset_rows(dataset_name)
    elif files:
        report.files = expand_files(files)
        source_rows = [item for p in report.files for item in _rows_of(p)]
    else:
        raise LoomError("no training data: pass --train-files FILE... or --dataset-name NAME")
    for where, row in source_rows:
        if max_rows is not None and report.rows_used >= max_rows:
            break
        report.rows_read += 1
        try:
            if isinstance(row, Exception):
                raise RowError(where, None, f"invalid JSON ({row})")
            report.examples.append(
                to_example(row, fmt, templates, where, row_id=where, label_field=label_field)
            )
        except RowError as exc:
            if not skip_bad_rows:
                raise
            report.skipped.append(str(exc).split(" (fix the row")[0])
    if not report.examples:
        raise LoomError(f"no usable rows ({report.rows_read} read, {len(report.skipped)} skipped)")
    return report


def _dataset_rows(name: str) -> list[tuple[str, Any]]:
    """Rows of a local ``datasets`` folder (save_to_disk) or a hub dataset's train split."""
    try:
        import datasets
    except ImportError:
        raise LoomError("--dataset-name needs the 'datasets' package: pip install datasets") from None
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
                raise OfflineError(
                    f"--dataset-name {name}: HF_HUB_OFFLINE is set; use a local folder or --train-files"
                )
            loaded = datasets.load_dataset(name)
    except (OSError, ValueError, ConnectionError) as exc:
        raise OfflineError(
            f"--dataset-name {name}: cannot load it ({type(exc).__name__}: {str(exc)[:160]}); "
            f"use a local dataset folder or --train-files"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise LoomError(f"--dataset-name {name}: no 'train' split (splits: {list(loaded)})")
        loaded = loaded["train"]
    return [(f"{name}:row {i}", dict(row)) for i, row in enumerate(loaded)]
