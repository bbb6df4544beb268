"""Loading base models and adapters (safetensors only)."""

from loom.models.loading import LoadedModel, LoadPlan, load_model, plan_load

__all__ = ["LoadPlan", "LoadedModel", "load_model", "plan_load"]
