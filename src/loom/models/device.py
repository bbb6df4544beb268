"""Device and dtype choice, shared by loading, training and serving."""

from __future__ import annotations

import os

import torch

from loom.errors import LoomError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under `accelerate launch`/torchrun each process owns the GPU of its local rank.
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoomError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise LoomError(f"unknown device {device!r} ({exc}); use cpu, cuda or cuda:N") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (fastest exact path there), bf16 on GPUs that support it."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise LoomError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
