"""Settings from the environment.

``LOOM_*`` names are Loom's own; ``MODEL_STORE_ROOT`` and
``MODEL_STORE_DRY_RUN`` are honoured because existing deployments set them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from platformdirs import user_data_dir

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


def default_store_root() -> str:
    """Where the store lives when nothing is configured."""
    return os.path.join(user_data_dir("loom", appauthor=False), "store")


@dataclass(frozen=True)
class Settings:
    store_root: str
    dry_run: bool
    s3_endpoint_url: str | None

    @classmethod
    def from_env(cls) -> Settings:
        root = os.environ.get("LOOM_STORE") or os.environ.get("MODEL_STORE_ROOT")
        return cls(
            store_root=root or default_store_root(),
            dry_run=_env_flag("LOOM_DRY_RUN", "MODEL_STORE_DRY_RUN"),
            s3_endpoint_url=os.environ.get("LOOM_S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"),
        )


def settings() -> Settings:
    """Read settings now (not cached: tests and CLI flags change the environment)."""
    return Settings.from_env()
