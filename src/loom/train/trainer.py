"""The TRL + PEFT part: load weights, wrap with LoRA (QLoRA on CUDA), SFTTrainer.fit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from loom.errors import LoomError
from loom.train.config import TrainConfig
from loom.train.packing import StepBlockSampler, pack_groups
from loom.train.progress import LossLog, RichProgress
from loom.train.ranks import is_main_process, sharded_launch
from loom.train.tokenize import IGNORE, Tokenized

WARMUP_RATIO = 0.03  # of the training steps, linear warm-up before the cosine decay


def warmup_args(ratio: float, transformers_version: str | None = None) -> dict[str, Any]:
    """The trainer arguments for a warm-up over ``ratio`` of the training steps, meaning the same
    on every transformers pyproject.toml allows: 5.x reads ``warmup_steps`` below 1 as a ratio and
    dropped ``warmup_ratio`` (5.2); 4.x refuses a float ``warmup_steps`` and takes ``warmup_ratio``."""
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    major = int(transformers_version.split(".", 1)[0])
    return {"warmup_steps": ratio} if major >= 5 else {"warmup_ratio": ratio}


def _dataset(items: list[Tokenized]) -> Any:
    from datasets import Dataset

    # Pre-tokenized with our own labels: TRL skips its own tokenization and
    # masking, and packs/pads these columns as they are.
    return Dataset.from_list([{"input_ids": t.input_ids, "labels": t.labels} for t in items])


def _packed_steps(
    items: list[Tokenized], examples_per_step: int, row_tokens: int, seed: int, pad_id: int
) -> tuple[Any, list[list[int]], int]:
    """Rows for `pack_groups`' steps as a Dataset, every step topped up to the same number
    of rows (returned as the width) with label-free one-token rows, and each step's block
    of row indices."""
    from datasets import Dataset

    steps = pack_groups([len(t.input_ids) for t in items], examples_per_step, row_tokens, seed)
    width = max(len(rows) for rows in steps)
    data: list[dict[str, list[int]]] = []
    blocks: list[list[int]] = []
    for rows in steps:
        blocks.append(list(range(len(data), len(data) + width)))
        for row in rows:
            data.append(
                {
                    "input_ids": [x for i in row for x in items[i].input_ids],
                    "labels": [x for i in row for x in items[i].labels],
                    "seq_lengths": [len(items[i].input_ids) for i in row],
                }
            )
        data += [{"input_ids": [pad_id], "labels": [IGNORE], "seq_lengths": [1]}] * (width - len(rows))
    return Dataset.from_list(data), blocks, width


def _step_trainer(base: type, blocks: list[list[int]], seed: int) -> type:
    """SFTTrainer that samples packed rows step block by step block (see loom.train.packing)."""

    class StepTrainer(base):
        def _get_train_sampler(self, train_dataset: Any = None) -> StepBlockSampler:
            return StepBlockSampler(blocks, seed)

    return StepTrainer


def _load_model(cfg: TrainConfig, path: str, device: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if cfg.qlora:
        import torch
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kw["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    # Training never reuses a KV cache, and with a cache object present transformers
    # skips the block-diagonal mask that keeps packed sequences apart.
    model.config.use_cache = False
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    elif sharded_launch() is None:
        # Under FSDP/ZeRO-3 the wrapper moves the weights shard by shard; the whole base on
        # every GPU first would cost the memory sharding saves.
        model.to(device)
    return model


def _training_args(
    cfg: TrainConfig, out_dir: Path, device: Any, dtype: Any, micro_batch: int, accumulation: int
) -> Any:
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        **warmup_args(WARMUP_RATIO),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        # Packed here (see loom.train.packing), then flattened padding-free by TRL's collator.
        max_length=None if cfg.packing else cfg.max_seq_length,
        packing=False,
        padding_free=cfg.packing,
        bf16=dtype == torch.bfloat16 and device.type == "cuda",
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        # Checkpointing trades ~30% more compute for activation memory: worth it
        # on GPUs, not on CPUs where memory is plentiful and compute is scarce.
        gradient_checkpointing=device.type == "cuda",
        dataloader_num_workers=0,
        # Every LoRA weight takes part in every forward: DDP need not search for unused ones
        # (an extra pass over the graph each step; with checkpointing on CUDA it must be off).
        ddp_find_unused_parameters=False,
    )


def fit(
    cfg: TrainConfig,
    base_path: str,
    tokenizer: Any,
    items: list[Tokenized],
    eval_items: list[Tokenized],
    targets: list[str],
    device: Any,
    dtype: Any,
    out_dir: Path,
    console: Console,
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    if cfg.resume and (not out_dir.is_dir() or get_last_checkpoint(str(out_dir)) is None):
        raise LoomError(
            f"--resume: no checkpoint-* folder in {out_dir} to resume from; "
            f"drop --resume or point --output_dir at the interrupted run"
        )
    lora = LoraConfig(
        r=cfg.adapter_r,
        lora_alpha=cfg.adapter_alpha,
        lora_dropout=cfg.adapter_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    micro_batch, accumulation = cfg.train_batch_size, cfg.gradient_accumulation
    blocks: list[list[int]] | None = None
    if not cfg.packing:
        train_dataset = _dataset(items)
    else:
        # One packed row per micro-step. On CPU rows stay within max_seq_length:
        # without flash attention a packed row costs attention over its whole length
        # squared (three flattened rows of 384 made packing only 1.12x). On CUDA a row may
        # hold what a padded micro-batch would.
        row_tokens = cfg.max_seq_length * (1 if device.type == "cpu" else cfg.train_batch_size)
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        train_dataset, blocks, width = _packed_steps(
            items, cfg.train_batch_size * cfg.gradient_accumulation, row_tokens, cfg.seed, pad_id
        )
        micro_batch, accumulation = 1, width
    # Before the model loads: these set up the process group, and under FSDP (rank 0 alone
    # reads the weights) or ZeRO-3 (weights partitioned as they load) from_pretrained needs it.
    args = _training_args(cfg, out_dir, device, dtype, micro_batch, accumulation)
    torch.manual_seed(cfg.seed)
    model = _load_model(cfg, base_path, device, dtype)
    log = LossLog()
    from peft import get_peft_model

    model = get_peft_model(model, lora)
    trainer = (SFTTrainer if blocks is None else _step_trainer(SFTTrainer, blocks, cfg.seed))(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=_dataset(eval_items) if eval_items else None,
        processing_class=tokenizer,
        # one progress bar per job, not per rank
        callbacks=[log, RichProgress(console)] if is_main_process() else [log],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs go to our bar and loss.csv, not stdout
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=True if cfg.resume else None)
    seconds = time.monotonic() - started
    eval_loss = trainer.evaluate()["eval_loss"] if eval_items else None
    if eval_loss is not None:
        log.rows.append(
            {
                "step": trainer.state.global_step,
                "epoch": trainer.state.epoch,
                "loss": None,
                "eval_loss": eval_loss,
                "learning_rate": None,
                "tokens_seen": trainer.state.num_input_tokens_seen,
                "elapsed_s": None,
            }
        )
    # On every rank: under FSDP/ZeRO-3 saving gathers the sharded adapter (a collective); the
    # Trainer writes the files from rank 0 only.
    trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        log.write_csv(out_dir / "loss.csv")
        log.write_png(out_dir / "loss.png", f"{cfg.adapter_name or 'adapter'}: loss")
    train_losses = [r["loss"] for r in log.rows if r.get("loss") is not None]
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    return {
        "steps": trainer.state.global_step,
        "epochs_done": round(float(trainer.state.epoch or 0), 4),
        "train_seconds": round(seconds, 3),
        "final_train_loss": train_losses[-1] if train_losses else result.training_loss,
        "mean_train_loss": result.training_loss,
        "final_eval_loss": eval_loss,
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_seen / seconds, 1) if seconds else None,
    }
