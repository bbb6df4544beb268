"""Training LoRA/QLoRA adapters with TRL's SFTTrainer + PEFT, published into the store."""

from loom.train.config import TrainConfig

__all__ = ["TrainConfig"]
