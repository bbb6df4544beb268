"""``loom serve``: the HTTP server (OpenAI-compatible + native routes) over one resident base."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from loom.cli.conversations import default_conversations
from loom.cli.output import console, print_json
from loom.errors import LoomError
from loom.vllm.options import DEFAULT_VLLM_PYTHON, VLLMOptions

_O = typer.Option

if TYPE_CHECKING:
    from loom.serve import ServeConfig
    from loom.serve.plan import ServePlan
    from loom.store import Store


def serve(
    base: str | None = _O(None, "--base", help="Base model ref (default: the store's default base)."),
    host: str = _O("127.0.0.1", "--host", help="Address to bind; beyond loopback, set LOOM_API_KEY."),
    port: int = _O(8000, "--port"),
    preload: list[str] | None = _O(None, "--preload", help="Adapter ref to load and pin at start (repeat)."),
    agents: Path | None = _O(
        None, "--agents", help="Agent map (AGENT_MODEL_MAP.json or YAML): agents served at /v1/agents."
    ),
    device: str = _O("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = _O(
        "auto",
        "--dtype",
        help="auto (CPU: fp32 or bf16, as measured faster; GPU: bf16), float32, bfloat16, float16, or a "
        "quantized CPU variant: "
        "int8 (per-channel) or int4 (group-wise), made once and cached in the store.",
    ),
    quantize: bool = _O(
        False,
        "--quantize",
        help="Serve a quantized variant: on CPU the agent map's preferred one or int8; on CUDA "
        "nf4/int8 (bitsandbytes).",
    ),
    allow_lossy: bool = _O(
        False,
        "--allow-lossy",
        help="Serve a quantized variant even when its recorded error against fp32 is over the "
        "quality bound (mean KL <= 0.05 nats, top-1 agreement >= 90% on the guard prompts).",
    ),
    max_batch_size: int = _O(32, "--max-batch-size", help="Requests decoded together."),
    max_seq_len: int = _O(1024, "--max-seq-len", help="Prompt + generated tokens per request."),
    kv_cache_mb: int | None = _O(None, "--kv-cache-mb", help="KV-cache budget (default: from the plan)."),
    prefix_cache_mb: int | None = _O(
        None,
        "--prefix-cache-mb",
        help="K/V of recent prompt prefixes kept for reuse (MiB; 0: off; default: plan).",
    ),
    max_prefill_tokens: int | None = _O(
        None,
        "--max-prefill-tokens",
        help="Prompt tokens prefilled per step; longer prompts go in chunks between decode steps, "
        "so running streams wait for one chunk at most (default: 256 on CPU, 4096 on GPU).",
    ),
    max_adapters: int = _O(16, "--max-adapters", help="Adapters resident at once."),
    max_lora_rank: int | None = _O(
        None,
        "--max-lora-rank",
        "--max-rank",
        help="Largest LoRA rank served (default: the largest among the stored adapters for the base, "
        "at least 64).",
    ),
    lora_targets: str | None = _O(
        None,
        "--lora-targets",
        help="Comma-separated projections given LoRA slots, of q_proj,k_proj,v_proj,o_proj,gate_proj,"
        "up_proj,down_proj (default: q/k/v/o and whatever the stored adapters for the base target).",
    ),
    memory_mb: int | None = _O(None, "--memory-mb", help="Memory budget (default: 90% of free)."),
    pack_weights: bool = _O(
        True,
        "--pack-weights/--no-pack-weights",
        help="CPU: hold weights oneDNN-packed (faster; fp32, and bf16 on CPUs with native bf16).",
    ),
    max_queue: int = _O(64, "--max-queue", help="Requests waiting beyond the batch before 429."),
    max_body_bytes: int = _O(1 << 20, "--max-body-bytes"),
    max_prompt_tokens: int | None = _O(None, "--max-prompt-tokens"),
    request_timeout: float = _O(300.0, "--request-timeout", help="Seconds before a generation is cut."),
    alias_refresh: float = _O(
        1.0, "--alias-refresh", help="Seconds before an alias move (set, rollback) reaches new requests."
    ),
    default_max_tokens: int = _O(128, "--default-max-tokens", help="max_tokens when a request sets none."),
    dry_run: bool = _O(False, "--dry-run", help="Print the plan from metadata alone; load nothing."),
    stub: bool = _O(False, "--stub", help="Test mode: a tiny random model instead of the base."),
    as_json: bool = _O(False, "--json", help="With --dry-run: print the plan as JSON."),
    log_level: str = _O("info", "--log-level"),
    request_log: str | None = _O(
        None,
        "--request-log",
        help="SQLite file logging every response (id, version, input, output, latency) and the feedback "
        "posted on them (POST /v1/feedback), or 'off'. Default: requests.sqlite beside a local store "
        "(<store root>/../requests.sqlite); for an s3:// store, in Loom's user data folder.",
    ),
    conversations: str | None = _O(
        None,
        "--conversations",
        help="Where /chat sessions are kept, surviving restarts: a SQLite file, a SQLAlchemy URL "
        "(postgresql+psycopg://user:PASSWORD@host/db, shared by replicas), or 'memory'. Default: "
        "conversations.sqlite beside a local store; for an s3:// store, in Loom's user data folder.",
    ),
    request_log_retention: int = _O(
        100_000, "--request-log-retention", help="Rows kept; the oldest go first (never those with feedback)."
    ),
    log_prompts: str = _O(
        "on", "--log-prompts", help="on, or off: keep inputs (prompts, payloads) out of the log."
    ),
    require_keys: bool = _O(
        False,
        "--require-keys",
        envvar="LOOM_REQUIRE_KEYS",
        help="Refuse to start unless LOOM_API_KEY is set.",
    ),
    backend: str = _O(
        "loom",
        "--backend",
        help="loom: Loom's engine in this process. vllm: vLLM's OpenAI server as a supervised child "
        "process on the store's base, with this server in front as the gateway.",
    ),
    vllm_python: str = _O(
        DEFAULT_VLLM_PYTHON,
        "--vllm-python",
        envvar="LOOM_VLLM_PYTHON",
        help="--backend vllm: the Python of vLLM's own environment (`make vllm` builds .venv-vllm).",
    ),
    vllm_port: int | None = _O(None, "--vllm-port", help="--backend vllm: vLLM's port (default: free)."),
    tensor_parallel_size: int = _O(1, "--tensor-parallel-size", help="--backend vllm: GPUs per model."),
    vllm_arg: list[str] | None = _O(
        None, "--vllm-arg", help="--backend vllm: one more flag passed to vLLM as is (repeat)."
    ),
    vllm_log: Path | None = _O(None, "--vllm-log", help="--backend vllm: vLLM's log file (default: temp)."),
) -> None:
    """Serve the base and its adapters over HTTP (OpenAI-compatible API, native routes, metrics).

    Keys: LOOM_API_KEY (clients), LOOM_ADMIN_KEY (pools and adapter loading)."""
    from loom.serve import ServeConfig, create_app
    from loom.serve.server import run

    if log_prompts not in ("on", "off"):
        raise LoomError(f"--log-prompts {log_prompts!r}: give on or off")
    if backend not in ("loom", "vllm"):
        raise LoomError(f"--backend {backend!r}: give loom or vllm")
    if backend == "vllm" and stub:
        raise LoomError("--stub runs a tiny random model in this process; drop it with --backend vllm")
    opts = VLLMOptions(vllm_python, vllm_port, tensor_parallel_size, list(vllm_arg or []), vllm_log)
    if backend == "vllm" and not dry_run:
        from loom.vllm.launch import check_python

        opts.python = check_python(vllm_python)  # a missing environment stops here, with the fix
    cfg = ServeConfig(
        base=base,
        host=host,
        port=port,
        device=device,
        dtype=dtype,
        allow_quantized=quantize,
        allow_lossy=allow_lossy,
        preload=list(preload or []),
        agents_file=agents,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        kv_cache_mb=kv_cache_mb,
        prefix_cache_mb=prefix_cache_mb,
        max_prefill_tokens=max_prefill_tokens,
        max_adapters=max_adapters,
        max_lora_rank=max_lora_rank,
        lora_targets=lora_targets.split(",") if lora_targets is not None else None,
        memory_mb=memory_mb,
        pack_weights=pack_weights,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
        request_timeout_s=request_timeout,
        alias_refresh_s=alias_refresh,
        default_max_tokens=default_max_tokens,
        stub=stub,
        require_keys=require_keys,
        request_log=_request_log_path(request_log),
        conversations=conversations or str(default_conversations()),  # --db of `loom conversations`
        request_log_retention=request_log_retention,
        log_prompts=log_prompts == "on",
        backend=backend,
        vllm=opts,
    )
    if dry_run:
        _dry_run(cfg, agents, as_json)
        return
    app = create_app(cfg)  # refuses --require-keys without keys before printing an address
    console.print(f"loom serve: http://{host}:{port} (OpenAI API under /v1, docs at /docs)")
    run(app, host, port, log_level)


def _dry_run(cfg: ServeConfig, agents: Path | None, as_json: bool) -> None:
    """Print the plan from metadata alone (and the vLLM command, with --backend vllm)."""
    from loom.serve.agents import ServedAgents
    from loom.serve.app import stub_engine
    from loom.serve.plan import plan_from_store
    from loom.store import Store

    served = ServedAgents(agents)
    refs = [*cfg.preload, *served.adapters()]
    cfg.variant_preference = served.variant_preference()
    store = Store()
    if cfg.stub:
        engine, plan = stub_engine(cfg)
        engine.shutdown()
    else:
        plan = plan_from_store(cfg, store, refs)  # also checks every preload resolves and fits
    command = vllm_command(plan, cfg.vllm, store, refs) if cfg.backend == "vllm" else None
    if as_json:
        print_json({**plan.describe(), "backend": cfg.backend, "vllm_command": command})
    else:
        console.print(_plan_table(plan, refs, command))


def _plan_table(plan: ServePlan, refs: list[str], command: str | None) -> Table:
    table = Table("setting", "value", title=f"loom serve plan: {plan.base_ref} (dry run, nothing loaded)")
    d = plan.describe()
    for key in (
        "device",
        "variant",
        "dtype",
        "max_batch_size",
        "max_seq_len",
        "kv_sequences",
        "max_prefill_tokens",
    ):
        table.add_row(key, str(d[key]))
    table.add_row("max_lora_rank", str(plan.max_rank))
    table.add_row("lora_targets", ", ".join(plan.lora_targets))
    table.add_row("resident adapters", f"{plan.adapter_slots} slots x {plan.adapter_slot_mb} MiB")
    table.add_row(
        "memory (MiB)",
        f"weights {plan.weights_mb} + adapters "
        f"{round(plan.adapter_slots * plan.adapter_slot_mb)} + KV cache {plan.kv_cache_mb} "
        f"+ prefix cache {plan.prefix_cache_mb} "
        f"+ activations {plan.activations_mb} + runtime {plan.runtime_mb} "
        f"= {plan.total_mb} of {plan.budget_mb}",
    )
    table.add_row("preload", ", ".join(refs) or "-")
    for note in plan.notes:
        table.add_row("note", note)
    if command is not None:
        table.add_row("vllm", command)
    return table


def _request_log_path(given: str | None) -> Path | None:
    from loom.config import settings
    from loom.serve.requestlog import default_log_path

    if given is None:
        return default_log_path(settings().store_root)
    return None if given.lower() == "off" else Path(given).expanduser()


def vllm_command(plan: ServePlan, opts: VLLMOptions, store: Store, preload: list[str]) -> str:
    """The vLLM command line ``--backend vllm`` would run for ``plan`` (nothing started)."""
    from loom.models.loading import plan_load
    from loom.vllm.start import launch_for

    loaded = plan_load(plan.base_ref, preload, store=store, strict=True, verify=False)
    launch = launch_for(plan, Path(loaded.base_path), opts, opts.python)
    launch.lora_modules = {a.ref: Path(p) for a, p in zip(loaded.adapters, loaded.adapter_paths, strict=True)}
    return launch.shell()
