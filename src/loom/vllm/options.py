"""The ``loom serve`` settings only the vLLM backend reads (imports nothing heavy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"  # what `make vllm` builds


@dataclass
class VLLMOptions:
    """The ``loom serve`` flags that only the vLLM backend reads."""

    python: str = DEFAULT_VLLM_PYTHON
    port: int | None = None  # None: a free loopback port
    tensor_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)  # passed through to vLLM as they are
    log_path: Path | None = None  # vLLM's stdout+stderr; None: a file in the temp folder
    start_timeout_s: float = 600.0
