"""The example agents (examples/agents/AGENT_MODEL_MAP.json) on their smoke payloads
(examples/agents/smoke/): each adapter trained for one step by `loom agents`' own path
(``loom.agents.examples.prepare`` + `loom train`) on the samples shipped in the repo, then every
payload run through the map. On the tiny random model (CI) and, as an integration test, on
the SmolLM2 default base: the outputs hold to each agent's schema, whatever the weights say."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.agents import load_agents
from loom.agents.examples import EXAMPLES, prepare
from loom.agents.sources import build_squad_registry
from loom.engine import Engine
from loom.store import Store
from loom.store.importers import import_hf_dir
from loom.train.config import load_config
from loom.train.run import train

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "agents" / "smoke"
MAP = REPO / "examples" / "agents" / "AGENT_MODEL_MAP.json"


def sample_data(root: Path) -> Path:
    """The shared data layout, filled from the samples in the repo (CI has no ../shared)."""
    snips = (REPO / "examples" / "snips_intent" / "train_sample.jsonl").read_text().splitlines()
    squad = (SMOKE / "squad_sample.jsonl").read_text()
    for task, train_rows, dev_rows in (
        ("snips_intent", "\n".join(snips[:16]) + "\n", "\n".join(snips[16:24]) + "\n"),
        ("squad_qa", squad, squad),
    ):
        (root / task).mkdir(parents=True)
        (root / task / "train.jsonl").write_text(train_rows)
        (root / task / "dev.jsonl").write_text(dev_rows)
    return root


def train_examples(store: Store, base: str, tmp: Path, max_seq_length: int) -> Path:
    """One-step adapters for the three example agents, and the map with a source registry."""
    data = sample_data(tmp / "data")
    for name in EXAMPLES:
        config = prepare(name, data, tmp / "prepared")
        overrides = {
            "model_name_or_path": base,
            "max_steps": 1,
            "max_train_samples": 4,
            "train_batch_size": 2,
            "max_seq_length": max_seq_length,
            "packing": False,
            "output_dir": tmp / "runs" / name,
        }
        train(load_config(config, overrides), store)
    folder = tmp / "map"
    folder.mkdir()
    shutil.copy(MAP, folder / MAP.name)
    build_squad_registry([SMOKE / "squad_sample.jsonl"], folder / "squad_sources.sqlite")
    return folder / MAP.name


def run_smoke(store: Store, engine: Engine, map_path: Path) -> None:
    agents = load_agents(map_path, engine=engine, store=store)
    assert not agents.errors, agents.errors
    for name in ("intent", "qa_cited", "re_ranker", "critic"):
        payloads = [json.loads(line) for line in (SMOKE / f"{name}.jsonl").read_text().splitlines()]
        agent = agents[name]
        results = agent.run_many(payloads)
        for result in results:
            assert result.error is None, result.error
            if agent.agent.output_type == "json":  # decoded under the schema: valid on the first step
                assert result.fallback.step == 0 and agent.agent.output_problem(result.output) is None
            else:
                assert isinstance(result.output, str) and result.model_version["base"]
        if agent.agent.adapter:
            assert any(r.model_version["adapter"] for r in results), name


@pytest.fixture(scope="module")
def tiny_agents(
    tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path
) -> Iterator[tuple[Store, Engine, Path]]:
    root = tmp_path_factory.mktemp("smoke")
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    store.set_default_base("tiny")
    map_path = train_examples(store, "tiny", root, 2048)
    engine = Engine.from_store(
        "tiny", device="cpu", store=store, max_batch_size=8, max_seq_len=2048, kv_cache_mb=64, max_rank=16
    )
    yield store, engine, map_path
    engine.shutdown()


def test_example_agents_hold_to_their_schemas_on_the_tiny_model(
    tiny_agents: tuple[Store, Engine, Path],
) -> None:
    run_smoke(*tiny_agents)


@pytest.mark.integration
def test_example_agents_hold_to_their_schemas_on_the_default_base(
    default_store: Store, tmp_path: Path
) -> None:
    base = "smollm2-135m-instruct"
    map_path = train_examples(default_store, base, tmp_path, 1024)
    engine = Engine.from_store(
        base, device="cpu", store=default_store, max_batch_size=8, max_seq_len=1024, max_rank=16
    )
    try:
        run_smoke(default_store, engine, map_path)
    finally:
        engine.shutdown()


def test_loom_agents_train_prepares_trains_and_publishes(
    tiny_agents: tuple[Store, Engine, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from loom.cli.main import app

    store = tiny_agents[0]
    monkeypatch.setenv("LOOM_STORE", str(store.url))
    data = sample_data(tmp_path / "data")
    args = [
        "agents",
        "train",
        "intent",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--max-steps",
        "1",
    ]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert summary["prompting"]["output_template"] == '{{"intent": "{label}"}}'
    assert len(store.summaries("adapter")) >= 3 and store.resolve("intent").manifest.training_summary
    bad = CliRunner().invoke(app, ["agents", "train", "nope", "--data", str(data)])
    assert bad.exit_code == 2 and "no example agent 'nope'" in bad.output
