"""The inference engine: one resident base, many LoRA adapters batched together."""

from loom.engine.engine import Engine, EngineConfig
from loom.engine.types import Completion, SamplingParams, StreamChunk

__all__ = ["Completion", "Engine", "EngineConfig", "SamplingParams", "StreamChunk"]
