"""The HTTP server: a thin FastAPI layer over ``loom.engine`` (OpenAI-compatible and native routes,
pools, metrics, auth and limits). See ``create_app`` and ``loom serve``."""

from loom.serve.app import create_app
from loom.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
