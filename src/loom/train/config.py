"""``loom train`` settings: one pydantic model for flags and ``--config FILE.yaml``.

YAML keys are the flag names (``-`` or ``_``); flags given on the command line
override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loom.data.formats import RowFormat
from loom.errors import LoomError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # what and where
    agent: str | None = None
    adapter_name: str | None = None
    model_name_or_path: str | None = None  # store ref, local dir or hf:org/model; default: store default
    output_dir: Path | None = None
    # data
    train_files: list[str] = Field(default_factory=list)
    dataset_name: str | None = None
    format: RowFormat = RowFormat.auto
    input_template: str | None = None
    output_template: str | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    label_field: str = "label"
    skip_bad_rows: bool = False
    max_train_samples: int | None = None
    eval_files: list[str] = Field(default_factory=list)
    val_split: float = 0.0
    max_seq_length: int = 512
    packing: bool = False
    # optimisation
    epochs: float = 1.0
    max_steps: int = -1
    train_batch_size: int = 8
    gradient_accumulation: int = 1
    learning_rate: float = 2e-4
    seed: int = 42
    logging_steps: int = 5
    save_steps: int = 200
    # adapter
    adapter_r: int = 16
    adapter_alpha: int = 32
    adapter_dropout: float = 0.05
    target_modules: list[str] | None = None
    qlora: bool = False
    # run
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    dry_run: bool = False
    publish: bool = False
    adapter_version: str | None = None
    bump: Literal["major", "minor", "patch", "auto"] | None = None  # semver version from the previous
    alias: str | None = None

    @field_validator("val_split")
    @classmethod
    def _split(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1), e.g. 0.1 for a 10% validation split")
        return v

    @field_validator("adapter_r", "train_batch_size", "gradient_accumulation", "max_seq_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge ``path`` (YAML) with the flags that were given; errors name the key."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise LoomError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LoomError(f"--config {path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise LoomError(f"--config {path}: expected a mapping of flag names to values")
        data = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        where = f" (from {path} and flags)" if path else ""
        raise LoomError(f"bad training settings{where}: {problems}") from None
