"""Loom: many task-specialised LoRA agents on one shared base model."""

__version__ = "0.1.0"
