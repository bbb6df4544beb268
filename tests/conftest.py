from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the dtype probe's cache (loom.models.dtype_probe) lives in the user cache folder: tests start
# from none and never write to the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="loom-test-cache-")

from helpers import ADAPTERS, make_lora_adapter, make_tiny_mistral, tiny_engine
from typer.testing import CliRunner

from loom.cli.main import app
from loom.engine import Engine
from loom.store import Store
from loom.store.adapters import publish_adapter
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


@pytest.fixture(scope="session")
def engine_store(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Store:
    """The tiny base ``tiny@v1`` with adapters qv4 (v1 current, v2), all8 and o2 under agent ``test``."""
    root = tmp_path_factory.mktemp("engine")
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    for name, (seed, r, targets) in ADAPTERS.items():
        folder = make_lora_adapter(tiny_dir, root / name, seed=seed, r=r, targets=targets)
        publish_adapter(store, folder, agent="test", name=name, base="tiny@v1", version="v1", alias="current")
    swap = make_lora_adapter(tiny_dir, root / "qv4-v2", seed=99, r=4, targets=("q_proj", "v_proj"))
    publish_adapter(store, swap, agent="test", name="qv4", base="tiny@v1", version="v2")
    return store


@pytest.fixture(scope="session")
def default_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store with the embedded SmolLM2 default base imported from its GGUF file (integration)."""
    root = tmp_path_factory.mktemp("default") / "store"
    result = CliRunner().invoke(app, ["store", "import-base", "--default", "--store", str(root)])
    assert result.exit_code == 0, (result.output, result.exception)
    return Store(root)


@pytest.fixture(scope="module")
def engine(engine_store: Store) -> Iterator[Engine]:
    """An engine on the tiny base, one per test module (modules may define their own)."""
    eng = tiny_engine(
        engine_store, max_batch_size=8, max_seq_len=128, kv_cache_mb=16, max_adapters=4, max_rank=8
    )
    yield eng
    eng.shutdown()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """With LOOM_NUMERIC_REPORT=1, list every logits comparison: error vs fp32 noise."""
    from helpers import NOISE_FACTOR, NUMERIC_LOG

    if not os.environ.get("LOOM_NUMERIC_REPORT") or not NUMERIC_LOG:
        return
    terminalreporter.section("numeric agreement (|got - fp64| vs fp32 reference noise)")
    for what, err, noise in NUMERIC_LOG:
        terminalreporter.line(f"{what:<40} err {err:.3e}  noise {noise:.3e}  ratio {err / noise:5.2f}")
    worst = max(err / noise for _, err, noise in NUMERIC_LOG)
    terminalreporter.line(f"worst ratio {worst:.2f} (bound {NOISE_FACTOR:g})")
