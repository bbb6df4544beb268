"""Trainer callbacks: a rich progress bar (loss, tokens/s, time left) and the loss log."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback


class LossLog(TrainerCallback):
    """Keeps every logged loss (train and eval) with tokens seen and wall time."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs or not ({"loss", "eval_loss"} & logs.keys()):
            return
        self.rows.append(
            {
                "step": state.global_step,
                "epoch": round(float(state.epoch or 0), 4),
                "loss": logs.get("loss"),
                "eval_loss": logs.get("eval_loss"),
                "learning_rate": logs.get("learning_rate"),
                "tokens_seen": state.num_input_tokens_seen,
                "elapsed_s": round(time.monotonic() - self.started, 3),
            }
        )

    def write_csv(self, path: Path) -> None:
        fields = ["step", "epoch", "loss", "eval_loss", "learning_rate", "tokens_seen", "elapsed_s"]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def write_png(self, path: Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in self.rows if r["loss"] is not None]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if r["eval_loss"] is not None]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


class RichProgress(TrainerCallback):
    """Steps, loss, tokens per second and time left, on stderr when it is a terminal."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.task: Any = None
        self.started = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started = time.monotonic()
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, loss="-", tps="-")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.progress.update(self.task, completed=state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if logs and "loss" in logs and self.task is not None:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            tps = state.num_input_tokens_seen / elapsed
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}", tps=f"{tps:,.0f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.progress.stop()
