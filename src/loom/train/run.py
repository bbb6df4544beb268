"""``loom train``: data → masked tokens → TRL SFTTrainer + PEFT → adapter (+ publish).

The training loop is TRL's; Loom owns what goes around it: data validation,
the response-only mask and its check, provenance (snapshot, base fingerprint,
library versions), outputs and publishing into the store.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import random
import resource
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from loom.data.formats import Templates
from loom.data.reader import ReadReport, read_rows
from loom.data.snapshot import content_hash, find_snapshot, snapshot
from loom.errors import LoomError
from loom.models.device import pick_device, pick_dtype
from loom.refs import parse_ref
from loom.store.facts import base_facts
from loom.store.hashing import sha256_stream
from loom.store.manifest import BaseInfo, Manifest, Source
from loom.store.store import Store
from loom.train.config import TrainConfig
from loom.train.estimate import estimate
from loom.train.ranks import (
    fail_here_for_tests,
    is_main_process,
    sharded_launch,
    wait_for_all_ranks,
    world_size,
)
from loom.train.tokenize import Tokenized, check_masks, show_mask, tokenize_examples

# All attention projections: PEFT's default (q, v) learns less per step for the
# same cost class; these names are shared by Llama, Mistral and SmolLM2.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class TrainResult:
    output_dir: Path
    summary: dict[str, Any]
    manifest: Manifest | None = None
    example: str = ""
    skipped: list[str] = field(default_factory=list)
    main_process: bool = True  # False on ranks > 0 of a multi-process run: they report nothing


@dataclass
class BaseChoice:
    ref: str  # store ref, path or hf:id as recorded
    path: str  # what from_pretrained gets
    info: BaseInfo | None
    in_store: bool


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("loom", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def choose_base(cfg: TrainConfig, store: Store) -> BaseChoice:
    from loom.models.loading import plan_load

    text = cfg.model_name_or_path or store.default_base()
    if text is None:
        raise LoomError(
            "no --model_name_or_path and the store has no default base: "
            "run 'loom store import-base --default' or pass a base ref"
        )
    ref = parse_ref(text)
    if ref.kind == "path":
        folder = Path(ref.name)
        if not (folder / "config.json").is_file():
            raise LoomError(f"--model_name_or_path {text}: no config.json there")
        return BaseChoice(str(folder), str(folder), base_facts(folder), in_store=False)
    plan = plan_load(text, store=store, dry_run=cfg.dry_run, verify=not cfg.dry_run)
    if plan.base is None:  # hub id not in the store
        return BaseChoice(f"hf:{plan.base_path}", plan.base_path, None, in_store=False)
    if plan.base.manifest.kind != "base":
        raise LoomError(f"--model_name_or_path {text} is a {plan.base.manifest.kind}, not a base model")
    return BaseChoice(plan.base.ref, plan.base_path, plan.base.manifest.base, in_store=True)


def _check_environment(cfg: TrainConfig) -> None:
    if cfg.qlora and (sharding := sharded_launch()):
        raise LoomError(
            f"--qlora under {sharding}: Loom loads the 4-bit base whole onto each rank's GPU, which "
            f"{sharding} cannot shard; launch with examples/accelerate/ddp.yaml or "
            f"deepspeed_zero2.yaml, or drop --qlora to shard a bf16 base"
        )
    if cfg.qlora:
        import torch

        if not torch.cuda.is_available():
            raise LoomError(
                "--qlora needs a CUDA GPU (bitsandbytes 4-bit); none is available here. "
                "Drop --qlora to train a plain LoRA adapter on this device"
            )
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:
            raise LoomError(f"--qlora needs bitsandbytes: pip install 'loom[cuda]' ({exc})") from None
    if cfg.report_to != "none":
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[cfg.report_to]
        try:
            importlib.import_module(module)
        except ImportError:
            raise LoomError(f"--report-to {cfg.report_to} needs: pip install {module}") from None
    if cfg.publish and not (cfg.agent and cfg.adapter_name):
        raise LoomError("--publish needs --agent and --adapter-name (where the adapter goes in the store)")
    if cfg.bump and not cfg.publish:
        raise LoomError(f"--bump {cfg.bump} names the published version; add --publish (or drop --bump)")
    if cfg.bump and cfg.adapter_version:
        raise LoomError("--bump and --adapter-version both name the version; give one of them")


def _read(cfg: TrainConfig) -> tuple[ReadReport, ReadReport | None]:
    templates = Templates(cfg.input_template, cfg.output_template, cfg.system_prompt)
    kw: dict[str, Any] = dict(
        fmt=cfg.format, templates=templates, skip_bad_rows=cfg.skip_bad_rows, label_field=cfg.label_field
    )
    train = read_rows(cfg.train_files or None, dataset_name=cfg.dataset_name, **kw)
    evals = read_rows(cfg.eval_files, **kw) if cfg.eval_files else None
    return train, evals


def _split(items: list[Tokenized], frac: float, seed: int) -> tuple[list[Tokenized], list[Tokenized]]:
    if frac <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(items) * frac))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def _output_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return cfg.output_dir
    if world_size() > 1:
        # Each rank would stamp its own clock; they must share one folder (checkpoints hold
        # every rank's RNG state, --resume reads them back).
        raise LoomError(
            f"loom train under {world_size()} processes needs --output_dir: every rank must "
            f"write the same run folder; pass e.g. --output_dir runs/{cfg.adapter_name or 'adapter'}-ddp"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.adapter_name or 'adapter'}-{stamp}"


def train(cfg: TrainConfig, store: Store | None = None, console: Console | None = None) -> TrainResult:
    """Run (or dry-run) one training job; returns where the outputs are and the summary."""
    from transformers import AutoTokenizer

    console = console or Console(stderr=True)
    store = store or Store()
    started = datetime.now(timezone.utc)
    _check_environment(cfg)
    base = choose_base(cfg, store)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    train_report, eval_report = _read(cfg)
    if cfg.max_train_samples is not None:
        train_report.examples = train_report.examples[: cfg.max_train_samples]
    items = tokenize_examples(train_report.examples, tokenizer, cfg.max_seq_length, cfg.prompt_template)
    eval_items = (
        tokenize_examples(eval_report.examples, tokenizer, cfg.max_seq_length, cfg.prompt_template)
        if eval_report
        else []
    )
    if not eval_items:
        items, eval_items = _split(items, cfg.val_split, cfg.seed)
    check_masks(items + eval_items, tokenizer)
    example = show_mask(items[0], tokenizer)

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    targets = cfg.target_modules or DEFAULT_TARGETS
    n_tokens = sum(len(t.input_ids) for t in items)
    out_dir = _output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)

    data_facts: dict[str, Any] = {
        "inputs": [{"path": str(p), "sha256": _file_sha256(p)} for p in train_report.files],
        "dataset_name": cfg.dataset_name,
        "rows_read": train_report.rows_read,
        "rows_used": train_report.rows_used,
        "rows_skipped": len(train_report.skipped),
        "train_examples": len(items),
        "eval_examples": len(eval_items),
        "tokens": n_tokens,
        "supervised_tokens": sum(t.supervised for t in items),
        "truncated_examples": sum(t.truncated for t in items),
        "snapshot": None,
    }
    if train_report.files:
        data_facts["content_sha256"] = content_hash(train_report.files)
        if cfg.dry_run:
            existing = find_snapshot(store, data_facts["content_sha256"])
            data_facts["snapshot"] = f"{existing.name}@{existing.version}" if existing else None
        elif is_main_process():
            snap_name = f"{cfg.adapter_name or cfg.agent or 'train'}-data"
            m, _created = snapshot(store, train_report.files, name=snap_name, label_field=cfg.label_field)
            data_facts["snapshot"] = f"{m.name}@{m.version}"

    summary: dict[str, Any] = {
        "status": "dry_run" if cfg.dry_run else "running",
        "agent": cfg.agent,
        "adapter_name": cfg.adapter_name,
        "base": {
            "ref": base.ref,
            "fingerprint": base.info.fingerprint if base.info else None,
            "chat_template_sha256": base.info.chat_template_sha256 if base.info else None,
        },
        "prompting": {
            "uses_chat_template": cfg.prompt_template is None and bool(tokenizer.chat_template),
            "prompt_template": cfg.prompt_template,
            "input_template": cfg.input_template,
            "output_template": cfg.output_template,
            "system_prompt": cfg.system_prompt,
            "format": cfg.format.value,
        },
        "hyperparameters": {
            **cfg.model_dump(mode="json", exclude={"train_files", "eval_files", "dry_run", "publish"}),
            "target_modules": targets,
        },
        "data": data_facts,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "libraries": _versions(),
        "started_at": started.isoformat(),
    }
    if base.info:
        longest = max(len(t.input_ids) for t in items)
        variant = "nf4_bnb" if cfg.qlora else str(dtype).removeprefix("torch.")
        est = estimate(
            base.info.arch,
            base.info.parameter_count,
            base.info.variant_vram_mb.get(variant, base.info.approx_vram_mb),
            targets,
            cfg.adapter_r,
            # A packed CPU micro-step is one row of up to max_seq_length tokens; on
            # CUDA one row holds up to what a padded micro-batch would.
            1 if cfg.packing and device.type == "cpu" else cfg.train_batch_size,
            cfg.max_seq_length if cfg.packing else min(cfg.max_seq_length, longest),
            int(n_tokens * max(cfg.epochs, 1.0)),
            str(device),
        )
        summary["estimate"] = asdict(est)

    if cfg.dry_run:
        summary["ended_at"] = datetime.now(timezone.utc).isoformat()
        main = is_main_process()
        if main:
            _write_summary(out_dir, summary)
        return TrainResult(out_dir, summary, example=example, skipped=train_report.skipped, main_process=main)

    from loom.train.trainer import fit

    outcome = fit(cfg, base.path, tokenizer, items, eval_items, targets, device, dtype, out_dir, console)
    peak_mb = _peak_memory_mb(device)
    summary.update(outcome)
    summary.update(
        status="completed",
        ended_at=datetime.now(timezone.utc).isoformat(),
        peak_memory_mb=peak_mb,
    )
    fail_here_for_tests()
    # Publishing is the commit point of the whole job: rank 0 goes on only once every rank got
    # here alive. A rank that died makes this barrier fail (or the launcher kills the others),
    # so nothing is published; after it the other ranks have nothing left to do.
    wait_for_all_ranks()
    if not is_main_process():
        return TrainResult(out_dir, summary, example=example, main_process=False)
    _write_summary(out_dir, summary)
    manifest = None
    if cfg.publish:
        from loom.store.adapters import publish_adapter

        if not base.in_store:
            raise LoomError(
                f"--publish needs the base in the store (got {base.ref}); import it with "
                f"'loom store import-base' and train on its ref. The adapter is saved in {out_dir}"
            )
        assert cfg.agent and cfg.adapter_name
        version = cfg.adapter_version
        if cfg.bump:
            version = _bump(cfg, store, base, summary)
            _write_summary(out_dir, summary)  # the published training_summary.json says why
        manifest = publish_adapter(
            store,
            out_dir,
            agent=cfg.agent,
            name=cfg.adapter_name,
            base=base.ref,
            training_summary=summary,
            source=Source(type="training_run", uri=str(out_dir.resolve())),
            version=version,
            alias=cfg.alias,
        )
    return TrainResult(out_dir, summary, manifest, example=example, skipped=train_report.skipped)


def _bump(cfg: TrainConfig, store: Store, base: BaseChoice, summary: dict[str, Any]) -> str:
    """The semver version ``--bump`` names, decided just before publishing (the latest previous
    version is read then); the decision goes into the summary."""
    from loom.train.versions import plan_version

    assert cfg.bump and cfg.adapter_name
    fingerprint = base.info.fingerprint if base.info else None
    plan = plan_version(store, cfg.adapter_name, cfg.bump, fingerprint, summary["data"]["snapshot"])
    summary["version_bump"] = asdict(plan)
    return plan.version


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh)[0]


def _peak_memory_mb(device: Any) -> int:
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device) / 2**20)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
