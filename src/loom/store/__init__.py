"""The model store: versioned, checksummed, crash-safe artifacts with aliases."""

from loom.store.manifest import Manifest
from loom.store.store import Resolved, Store

__all__ = ["Manifest", "Resolved", "Store"]
