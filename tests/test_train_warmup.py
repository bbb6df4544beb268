"""The learning-rate warm-up means the same fraction of the training steps on every transformers
version pyproject.toml allows (4.56 took a float ``warmup_steps`` as a step count and refused it;
5.x reads one below 1 as a ratio and has no ``warmup_ratio``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
from transformers import TrainingArguments

from loom.train.trainer import WARMUP_RATIO, warmup_args


def test_warmup_is_a_ratio_of_the_steps_on_this_transformers(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), **warmup_args(0.1))
    assert args.get_warmup_steps(200) == 20
    assert TrainingArguments(output_dir=str(tmp_path), **warmup_args(WARMUP_RATIO)).get_warmup_steps(100) == 3


@pytest.mark.parametrize(
    ("version", "expected"),
    [("4.56.2", {"warmup_ratio": 0.1}), ("5.0.0", {"warmup_steps": 0.1}), ("5.24.0", {"warmup_steps": 0.1})],
)
def test_warmup_uses_the_argument_each_major_version_reads_as_a_ratio(
    version: str, expected: dict[str, float]
) -> None:
    assert warmup_args(0.1, version) == expected
    assert warmup_args(0.1) == warmup_args(0.1, transformers.__version__)
