from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_lora_adapter, make_tiny_mistral

from loom.store import Store
from loom.store.importers import import_hf_dir


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny") / "tiny-mistral")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(tiny_dir, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    root = tmp_path / "store"
    monkeypatch.setenv("LOOM_STORE", str(root))
    monkeypatch.delenv("MODEL_STORE_ROOT", raising=False)
    return Store(root)


@pytest.fixture
def tiny_base(store: Store, tiny_dir: Path) -> str:
    m = import_hf_dir(store, tiny_dir, "tiny-mistral", version="v1", alias="current")
    store.set_default_base("tiny-mistral")
    return f"{m.name}@{m.version}"
