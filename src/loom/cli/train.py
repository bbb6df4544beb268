"""``loom train``: flags (the names existing users know) → TrainConfig → loom.train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from loom.cli.output import console, err_console, print_json
from loom.data.formats import RowFormat

_O = typer.Option


def train(
    config: Path | None = _O(None, "--config", help="YAML file with the same keys as the flags."),
    agent: str | None = _O(None, "--agent", help="Agent the adapter serves."),
    adapter_name: str | None = _O(None, "--adapter-name", help="Adapter name in the store."),
    model_name_or_path: str | None = _O(
        None, "--model_name_or_path", "--model-name-or-path", help="Base: store ref, folder or hf:org/model."
    ),
    output_dir: Path | None = _O(None, "--output_dir", "--output-dir", help="Where outputs go."),
    train_files: list[str] | None = _O(None, "--train-files", help="JSON/JSONL files or globs (repeat)."),
    dataset_name: str | None = _O(None, "--dataset-name", help="A datasets name or local dataset folder."),
    format: RowFormat | None = _O(None, "--format", help="Row format (default: auto-detect)."),
    input_template: str | None = _O(None, "--input-template", help="Prompt from row fields: 'Q: {text}'."),
    output_template: str | None = _O(None, "--output-template", help="Response from row fields."),
    prompt_template: str | None = _O(
        None, "--prompt-template", help="Raw prompt format with {prompt} (instead of the chat template)."
    ),
    system_prompt: str | None = _O(None, "--system-prompt", help="System message for every example."),
    label_field: str | None = _O(None, "--label-field", help="Field with the label (snapshot breakdown)."),
    skip_bad_rows: bool | None = _O(None, "--skip-bad-rows", help="Skip and count bad rows."),
    max_train_samples: int | None = _O(None, "--max-train-samples"),
    eval_files: list[str] | None = _O(None, "--eval-files", help="Held-out JSON/JSONL files."),
    val_split: float | None = _O(None, "--val-split", help="Fraction of train held out when no eval files."),
    max_seq_length: int | None = _O(None, "--max-seq-length"),
    packing: bool | None = _O(None, "--packing/--no-packing", help="Pack examples (padding-free)."),
    epochs: float | None = _O(None, "--epochs"),
    max_steps: int | None = _O(None, "--max-steps", help="Overrides --epochs when > 0."),
    train_batch_size: int | None = _O(None, "--train-batch-size"),
    gradient_accumulation: int | None = _O(None, "--gradient-accumulation"),
    learning_rate: float | None = _O(None, "--learning-rate"),
    adapter_r: int | None = _O(None, "--adapter-r"),
    adapter_alpha: int | None = _O(None, "--adapter-alpha"),
    adapter_dropout: float | None = _O(None, "--adapter-dropout"),
    target_modules: str | None = _O(None, "--target-modules", help="Comma-separated module names."),
    seed: int | None = _O(None, "--seed"),
    qlora: bool | None = _O(None, "--qlora", help="4-bit base via bitsandbytes (CUDA only)."),
    resume: bool | None = _O(None, "--resume", help="Resume from the last checkpoint in --output_dir."),
    report_to: str | None = _O(None, "--report-to", help="none, tensorboard, mlflow or wandb."),
    device: str | None = _O(None, "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str | None = _O(None, "--dtype", help="auto, float32, bfloat16, float16."),
    dry_run: bool | None = _O(None, "--dry-run", help="Check everything and estimate; train nothing."),
    publish: bool | None = _O(None, "--publish", help="Publish the adapter into the store."),
    adapter_version: str | None = _O(None, "--adapter-version", help="Version (default vYYYYMMDD-HHMM)."),
    bump: str | None = _O(
        None,
        "--bump",
        help="Version vX.Y.Z after the previous one: major, minor, patch or auto (from lineage).",
    ),
    alias: str | None = _O(None, "--alias", help="Alias to move to the published version."),
    root: str | None = _O(None, "--store", envvar="LOOM_STORE", help="Store root."),
    as_json: bool = _O(False, "--json", help="Print the training summary as JSON."),
) -> None:
    """Train a LoRA/QLoRA adapter from JSONL with TRL + PEFT, optionally publishing it."""
    overrides: dict[str, Any] = {k: v for k, v in locals().items() if k not in {"config", "root", "as_json"}}
    from loom.store import Store
    from loom.train.config import load_config
    from loom.train.run import train as run_train

    for key in ("train_files", "eval_files"):
        if not overrides[key]:
            overrides[key] = None
    cfg = load_config(config, overrides)
    result = run_train(cfg, Store(root), err_console)
    if not result.main_process:  # rank 0 reports for the whole multi-process job
        return
    if as_json:
        print_json(result.summary)
        return
    _report(result)


def _report(result: Any) -> None:
    s = result.summary
    d = s["data"]
    table = Table.grid(padding=(0, 2))
    rows: list[tuple[str, Any]] = [
        ("status", s["status"]),
        ("base", f"{s['base']['ref']} ({s['base']['fingerprint']})"),
        ("device", f"{s['device']} {s['dtype']}"),
        ("rows", f"{d['rows_read']} read, {d['rows_used']} used, {d['rows_skipped']} skipped"),
        ("examples", f"{d['train_examples']} train, {d['eval_examples']} eval"),
        (
            "tokens",
            f"{d['tokens']:,} ({d['supervised_tokens']:,} supervised, "
            f"{d['truncated_examples']} examples truncated)",
        ),
        ("snapshot", d.get("snapshot") or "(not published in a dry run)"),
    ]
    if "estimate" in s:
        e = s["estimate"]
        rows.append(("estimate", f"~{e['total_mb']:,} MB memory, ~{e['time_s']:.0f} s ({e['assumption']})"))
    if s["status"] == "completed":
        rows += [
            (
                "loss",
                f"train {s['final_train_loss']:.4f}"
                + (f", eval {s['final_eval_loss']:.4f}" if s.get("final_eval_loss") else ""),
            ),
            ("speed", f"{s['tokens_per_second']} tok/s over {s['train_seconds']:.1f} s, {s['steps']} steps"),
            ("peak memory", f"{s['peak_memory_mb']:,} MB"),
        ]
    rows.append(("output", str(result.output_dir)))
    if result.manifest is not None:
        m = result.manifest
        rows.append(("published", f"{m.name}@{m.version} (agent {m.agent})"))
    if "version_bump" in s:
        rows.append(("version bump", f"{s['version_bump']['kind']}: {s['version_bump']['reason']}"))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", escape(str(value)))
    console.print(table)
    console.print("[bold]one example[/] (trained tokens in «»):")
    console.print(escape(result.example), highlight=False)
    for msg in result.skipped[:5]:
        err_console.print(f"[yellow]skipped[/] {escape(msg)}")
