"""Settings of one ``loom serve`` process (flags, with keys from the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loom.conversations.store import DEFAULT_MAX_MESSAGES, DEFAULT_MAX_SESSIONS
from loom.vllm.options import VLLMOptions


@dataclass
class ServeConfig:
    base: str | None = None  # None: the store's default base
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    allow_quantized: bool = False
    # serve a quantized variant whose recorded error against fp32 is over the quality guard's
    # bounds (loom.models.quality: mean KL <= 0.05, greedy agreement >= 95%)
    allow_lossy: bool = False
    preload: list[str] = field(default_factory=list)
    agents_file: Path | None = None
    # the agent map's variant_preference (e.g. ["bf16", "fp32"]): with --dtype auto, the plan serves
    # the first of these the device and the base's manifest offer
    variant_preference: list[str] = field(default_factory=list)
    # engine sizing (None: decided by the plan from the manifests and the device's memory)
    max_batch_size: int = 32
    max_seq_len: int = 1024
    kv_cache_mb: int | None = None
    prefix_cache_mb: int | None = None  # prompt-prefix K/V kept for reuse; 0: off; None: the plan's
    max_adapters: int = 16
    # LoRA slots (None: what the stored adapters for the base use; see loom.serve.lora_limits)
    lora_targets: list[str] | None = None  # q_proj ... down_proj
    max_lora_rank: int | None = None
    memory_mb: int | None = None  # budget override; default: a fraction of what the device has free
    memory_fraction: float = 0.9
    pack_weights: bool = True  # CPU: oneDNN-packed weights (EngineConfig.pack_weights)
    # prompt tokens prefilled per scheduler step; longer prompts go in chunks (None: the plan's)
    max_prefill_tokens: int | None = None
    # limits
    api_key: str | None = field(default_factory=lambda: os.environ.get("LOOM_API_KEY") or None)
    admin_key: str | None = field(default_factory=lambda: os.environ.get("LOOM_ADMIN_KEY") or None)
    require_keys: bool = False  # refuse to start without LOOM_API_KEY instead of warning
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: max_seq_len - 1
    max_queue: int = 64  # requests waiting beyond the running batch before answering 429
    request_timeout_s: float = 300.0
    # the longest an alias move (alias set, rollback, promotion) takes to reach new requests
    alias_refresh_s: float = 1.0
    default_max_tokens: int = 128
    max_sessions: int = DEFAULT_MAX_SESSIONS  # per API key
    max_session_messages: int = DEFAULT_MAX_MESSAGES
    # /chat sessions (loom.conversations): a SQLAlchemy URL or a SQLite path; None: in memory only
    # (`loom serve` defaults to conversations.sqlite beside the store: --conversations)
    conversations: str | None = None
    # "loom" (Loom's engine in this process) or "vllm" (a supervised vLLM child process behind
    # this server as its gateway: loom.vllm); the vLLM-only flags are in vllm
    backend: str = "loom"
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    stub: bool = False  # documented test mode: a tiny random model instead of the base
    # the request log (loom.serve.requestlog): one SQLite row per response, and the feedback on them.
    # None: off (`loom serve` defaults to requests.sqlite beside the store: --request-log)
    request_log: Path | None = None
    request_log_retention: int = 100_000  # rows; the oldest beyond it are deleted (not those with feedback)
    log_prompts: bool = True  # False: inputs (prompts, payloads) stay out of the log
