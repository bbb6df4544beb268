"""The agents layer on the tiny random Mistral: the map's validation, prompt parity with
training, the inferred enum schema, every fallback trigger, batching, and the HTTP routes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import train_tiny_intent

from loom.agents import AgentFailed, load_agents, load_map_file
from loom.agents.agent import BaseFacts, build_agent
from loom.agents.spec import parse_agent_map
from loom.data.formats import RowFormat, Templates, to_example
from loom.engine import Engine
from loom.errors import LoomError
from loom.serve import ServeConfig, create_app
from loom.serve.server import serve_in_thread
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.importers import import_hf_dir
from loom.train.tokenize import IGNORE, tokenize_examples

SYSTEM = "You label requests."
INPUT = "Intent of: {text}"
OUTPUT = '{{"intent": "{label}"}}'
ROWS = [
    {"text": f"{w} {i}", "label": lab}
    for i in range(4)
    for w, lab in (("ask a", "A"), ("buy b", "B"), ("call c", "C"))
]


@pytest.fixture(scope="module")
def agent_store(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Store:
    """``tiny@v1`` with ``intent`` trained by `loom train` (fields format, labels A/B/C)."""
    root = tmp_path_factory.mktemp("agents")
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    store.set_default_base("tiny")
    train_tiny_intent(
        store, ROWS, root, version="v1", alias=None,
        system_prompt=SYSTEM, input_template=INPUT, output_template=OUTPUT,
    )  # fmt: skip
    return store


@pytest.fixture(scope="module")
def agent_engine(agent_store: Store) -> Iterator[Engine]:
    eng = Engine.from_store(
        "tiny",
        device="cpu",
        store=agent_store,
        max_batch_size=8,
        max_seq_len=256,
        kv_cache_mb=16,
        max_adapters=4,
        max_rank=8,
    )
    yield eng
    eng.shutdown()


def write_map(tmp: Path, agents: dict[str, Any], **top: Any) -> Path:
    path = tmp / "AGENT_MODEL_MAP.json"
    path.write_text(json.dumps({"agents": agents, **top}))
    return path


# ----------------------------------------------------------------- the map
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"adapter": "../etc"}, "agent 'intent', field adapter: .*store ref"),
        ({"adapter": "intent", "generation": {"temperature": -1}}, "field generation.temperature: .*greater"),
        ({"adapter": "intent", "fallback": [{"python": "nocolon"}]}, r"field fallback.0: .*module:function"),
        ({"adapter": "intent", "fallback": [{"base": True, "stub": 1}]}, "exactly one of"),
        ({"adapter": "intent", "ouput": {}}, "field ouput: unknown field"),
        ({"adapter": "intent", "variant_preference": ["int3"]}, "unknown variants"),
    ],
)
def test_map_errors_name_the_file_the_agent_and_the_field(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    path = write_map(tmp_path, {"intent": entry})
    with pytest.raises(LoomError, match=message) as err:
        load_map_file(path)
    assert str(path) in str(err.value)


def test_yaml_maps_and_the_old_format_still_load(tmp_path: Path) -> None:
    old = tmp_path / "agents.yaml"
    old.write_text("agents:\n  bot:\n    adapter: all8\n    system: You are terse.\n  plain: o2\n")
    doc = load_map_file(old)
    assert doc.agents["bot"].prompt is not None and doc.agents["bot"].prompt.system == "You are terse."
    assert doc.agents["plain"].adapter == "o2"


# ----------------------------------------------------------------- prompts and schemas
def test_the_agent_prompt_is_the_prompt_training_saw(
    agent_store: Store, agent_engine: Engine, tmp_path: Path
) -> None:
    agents = load_agents(write_map(tmp_path, {"intent": {"adapter": "intent"}}), engine=agent_engine)
    agent = agents["intent"].agent
    assert agent.prompt.source == "training" and agent.warnings == []
    row = {"text": "buy b 9", "label": "B"}
    example = to_example(
        row,
        RowFormat.fields,
        Templates(system_prompt=SYSTEM, input_template=INPUT, output_template=OUTPUT),
        "x:1",
        "r1",
    )
    trained = tokenize_examples([example], agent_engine.tokenizer, 512)[0]
    prompt_part = [t for t, lab in zip(trained.input_ids, trained.labels, strict=True) if lab == IGNORE]
    assert agent.prompt.token_ids(agent_engine.tokenizer, {"text": "buy b 9"}) == prompt_part


def test_the_output_schema_is_an_enum_of_the_snapshot_labels(
    agent_store: Store, agent_engine: Engine, tmp_path: Path
) -> None:
    agents = load_agents(write_map(tmp_path, {"intent": {"adapter": "intent"}}), engine=agent_engine)
    agent = agents["intent"]
    assert agent.agent.output_schema == {
        "type": "object",
        "properties": {"intent": {"type": "string", "enum": ["A", "B", "C"]}},
        "required": ["intent"],
        "additionalProperties": False,
    }
    assert agent.agent.input_schema["required"] == ["text"]
    results = agent.run_many([{"text": r["text"]} for r in ROWS[:6]])  # a random model, held to the schema
    assert all(r.output["intent"] in "ABC" and r.fallback.step == 0 for r in results)
    assert {r.model_version["adapter"] for r in results} == {"intent@v1"}
    assert results[0].model_version["base"] == "tiny@v1"
    with pytest.raises(LoomError, match=r"input: 'text' is a required property"):
        agent.run({"txt": "x"})
    with pytest.raises(LoomError, match=r"input.text: \[1\] is not of type"):
        agent.run({"text": [1]})


def test_a_changed_chat_template_is_refused_unless_the_map_allows_it(
    agent_store: Store, tmp_path: Path
) -> None:
    summary = dict(agent_store.resolve("intent").manifest.training_summary or {})
    summary["base"] = {**summary["base"], "chat_template_sha256": "0" * 64}
    folder = agent_store.backend.local_path(agent_store.resolve("intent@v1").rel)
    publish_adapter(
        agent_store,
        folder,
        agent="intent",
        name="intent-old",
        base="tiny@v1",
        version="v1",
        training_summary=summary,
    )
    base = agent_store.resolve("tiny@v1")
    facts = BaseFacts(base.ref, base.manifest.base)
    doc = parse_agent_map({"old": {"adapter": "intent-old"}}, "m.json")
    with pytest.raises(
        LoomError, match="trained under chat template sha256 000000000000, but the served base has"
    ):
        build_agent("old", doc.agents["old"], agent_store, facts)
    doc = parse_agent_map(
        {"old": {"adapter": "intent-old", "prompt": {"allow_template_mismatch": True}}}, "m.json"
    )
    agent = build_agent("old", doc.agents["old"], agent_store, facts)
    assert any("allowed by the map" in w for w in agent.warnings)


def test_prompts_of_adapters_trained_without_a_chat_template_or_overridden(agent_engine: Engine) -> None:
    from loom.agents.prompting import agent_prompt
    from loom.agents.spec import AgentEntry

    tok = agent_engine.tokenizer
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = None  # a base without a chat template: training used a prompt format
    entry = AgentEntry(adapter="x")
    for recorded in (None, "Q: {prompt}\nA: "):
        prompting = {"uses_chat_template": False, "prompt_template": recorded, "format": "prompt_response"}
        prompt = agent_prompt("x", entry, {"prompting": prompting}, None)
        example = to_example(
            {"prompt": "hi there", "response": "ok"}, RowFormat.auto, Templates(), "x:1", "r"
        )
        trained = tokenize_examples([example], plain, 512, recorded)[0]
        want = [t for t, lab in zip(trained.input_ids, trained.labels, strict=True) if lab == IGNORE]
        assert prompt.token_ids(tok, {"prompt": "hi there"}) == want, recorded
        assert prompt.fields == ["prompt"]  # prompt/response rows: no input template applied
    prompting = {
        "uses_chat_template": True,
        "system_prompt": "A",
        "input_template": "T: {text}",
        "output_template": "{label}",
        "format": "fields",
    }
    over = AgentEntry(adapter="x", prompt={"system": "B"})
    prompt = agent_prompt("x", over, {"prompting": prompting}, None)
    assert prompt.system == "B" and prompt.input_template == "T: {text}" and prompt.source == "map"
    assert prompt.warnings == ("system prompt overridden by the map (the adapter was trained with another)",)


def test_a_legacy_step_may_not_name_another(agent_engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "AGENT_MODEL_RECOMMENDED.json").write_text(json.dumps({"loop": {"legacy": "loop"}}))
    entry = {"adapter": "intent", "fallback": [{"legacy": "loop"}]}
    with pytest.raises(LoomError, match="legacy 'loop' names another legacy step"):
        load_agents(write_map(tmp_path, {"intent": entry}), engine=agent_engine)


# ----------------------------------------------------------------- fallbacks
def run_one(
    tmp_path: Path, engine: Engine, entry: dict[str, Any], payload: dict[str, Any], **top: Any
) -> Any:
    return load_agents(write_map(tmp_path, {"intent": entry}, **top), engine=engine)["intent"].run(payload)


def test_disabled_adapter_goes_down_the_chain(
    agent_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTENT_DISABLE_MISTRAL", "1")  # the legacy spelling
    r = run_one(tmp_path, agent_engine, {"adapter": "intent", "fallback": ["base"]}, {"text": "ask a"})
    assert (r.fallback.step, r.fallback.kind) == (1, "base") and r.model_version["adapter"] is None
    assert "disabled by INTENT_DISABLE_MISTRAL" in r.fallback.reasons[0]
    assert r.output["intent"] in "ABC"  # the base runs under the same schema and prompt


def test_missing_adapter_and_a_failing_tool_fall_through_to_python(
    agent_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTENT_DISABLE_ADAPTER", "1")
    (tmp_path / "AGENT_MODEL_RECOMMENDED.json").write_text(
        json.dumps({"old-intent": {"python": "helpers:fallback_answer"}})
    )
    entry = {
        "adapter": "intent",
        "fallback": ["ghost@v9", {"python": "helpers:failing_fallback"}, {"legacy": "old-intent"}],
    }
    r = run_one(tmp_path, agent_engine, entry, {"text": "buy b"})
    assert (r.fallback.step, r.fallback.kind, r.output) == (3, "legacy", {"intent": "B"})
    reasons = r.fallback.reasons
    assert "step 1 (adapter ghost@v9): adapter:" in reasons[1] and "ghost" in reasons[1]
    assert "python helpers:failing_fallback raised RuntimeError" in reasons[2]


def test_invalid_json_after_one_repair_falls_back(agent_engine: Engine, tmp_path: Path) -> None:
    entry = {"adapter": "intent", "generation": {"max_tokens": 2}, "fallback": [{"stub": {"intent": "C"}}]}
    r = run_one(tmp_path, agent_engine, entry, {"text": "call c"})  # 2 then 4 tokens cannot close the object
    assert (r.fallback.step, r.output) == (1, {"intent": "C"})
    assert "output is not valid JSON (after one repair attempt)" in r.fallback.reasons[0]


def test_the_repair_attempt_rescues_unconstrained_output(agent_engine: Engine, tmp_path: Path) -> None:
    """Decoded without the grammar first, the random model's text is no JSON; the one repair
    attempt (greedy, under the schema's grammar) answers on the agent's own step."""
    entry = {
        "adapter": "intent",
        "output": {"constrained": False},
        "generation": {"max_tokens": 16},
        "fallback": [{"stub": {"intent": "C"}}],
    }
    results = load_agents(write_map(tmp_path, {"intent": entry}), engine=agent_engine)["intent"].run_many(
        [{"text": r["text"]} for r in ROWS[:3]]
    )
    assert all(r.fallback.step == 0 and r.output["intent"] in "ABC" for r in results), results


def test_low_confidence_answers_fall_back_and_the_first_is_kept_if_nothing_beats_it(
    agent_engine: Engine, tmp_path: Path
) -> None:
    text = {"input_template": "{text}", "output": {"type": "text"}, "confidence": {"citations": "required"}}
    entry = {**text, "fallback": [{"stub": "It might be Paris."}, {"stub": "Paris <<SRC:wiki:Paris>>"}]}
    r = run_one(tmp_path, agent_engine, entry, {"text": "capital of France?"})
    assert r.fallback.step == 2 and r.confidence["level"] == "high" and r.citations
    assert any("low confidence (hedges ('might be')" in x for x in r.fallback.reasons)
    only_low = {**text, "fallback": [{"stub": "I'm not sure."}]}
    r = run_one(tmp_path, agent_engine, only_low, {"text": "?"})  # both steps low: the first is kept
    assert r.confidence["level"] == "low" and r.fallback.step == 0 and r.raw != "I'm not sure."
    assert len(r.fallback.reasons) == 2 and "step 1 (stub): low confidence (hedges" in r.fallback.reasons[1]


def test_a_remote_endpoint_that_is_down_falls_through_and_a_spent_chain_says_why(
    agent_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTENT_DISABLE_ADAPTER", "1")
    entry = {"adapter": "intent", "fallback": [{"endpoint": "http://127.0.0.1:9", "timeout_s": 2}]}
    with pytest.raises(
        AgentFailed,
        match=r"every step failed: step 0 .*disabled.*step 1 \(endpoint http://127.0.0.1:9\): endpoint:",
    ):
        run_one(tmp_path, agent_engine, entry, {"text": "x"})


# ----------------------------------------------------------------- batching
def test_run_many_goes_through_the_engine_as_one_burst(
    agent_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = load_agents(write_map(tmp_path, {"intent": {"adapter": "intent"}}), engine=agent_engine)["intent"]
    agent.run({"text": "warm"})  # the adapter resident first: the burst is then one prefill
    sizes: list[int] = []
    real = agent_engine.scheduler._prefill

    def spy(reqs: Any) -> None:
        sizes.append(len(reqs))
        real(reqs)

    monkeypatch.setattr(agent_engine.scheduler, "_prefill", spy)
    results = agent.run_many([{"text": r["text"]} for r in ROWS[:6]])
    assert len(results) == 6 and sizes and sizes[0] == 6, sizes


# ----------------------------------------------------------------- HTTP
def test_agent_routes_answer_and_refuse_bad_input_without_hurting_others(
    agent_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = {
        "intent": {"adapter": "intent", "fallback": [{"stub": {"intent": "A"}}]},
        "critic": {
            "system": "Score the draft.",
            "input_template": "Draft: {draft}",
            "output": {
                "type": "json",
                "schema": {
                    "type": "object",
                    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
                    "required": ["score"],
                    "additionalProperties": False,
                },
            },
            "generation": {"max_tokens": 12},
        },
        "broken": {"adapter": "no-such-adapter"},
        "flaky": {"adapter": "intent", "fallback": [{"endpoint": "http://127.0.0.1:9", "timeout_s": 2}]},
        "cited": {  # its adapter disabled: the stub answers, citing a known and an unknown source
            "adapter": "intent",
            "output": {"type": "text"},
            "fallback": [{"stub": "Paris <<SRC:wiki:Paris>>, not <<SRC:wiki:Nowhere>>."}],
        },
    }
    registry = tmp_path / "sources.json"
    registry.write_text(
        json.dumps({"wiki:Paris": {"name": "Paris", "url": "https://en.wikipedia.org/wiki/Paris"}})
    )
    monkeypatch.setenv("CITED_DISABLE_ADAPTER", "1")
    monkeypatch.setenv("FLAKY_DISABLE_ADAPTER", "1")  # its whole chain fails: per-item errors
    cfg = ServeConfig(agents_file=write_map(tmp_path, agents, sources=str(registry)), max_queue=8)
    with serve_in_thread(create_app(cfg, engine=agent_engine)) as url:
        listed = {a["name"]: a for a in httpx.get(f"{url}/v1/agents").json()["data"]}
        assert listed["intent"]["output"]["schema"]["properties"]["intent"]["enum"] == ["A", "B", "C"]
        assert listed["broken"]["status"] == "unavailable" and "no-such-adapter" in listed["broken"]["error"]
        one = httpx.post(f"{url}/v1/agents/intent/run", json={"input": {"text": "ask a"}}).json()
        assert httpx.get(f"{url}/v1/agents/intent").json()["adapter_version"] == "intent@v1"
        assert one["output"]["intent"] in "ABC" and one["model_version"] == {
            "base": "tiny@v1",
            "adapter": "intent@v1",
        }
        assert set(one) >= {
            "output",
            "raw",
            "model_version",
            "citations",
            "fallback",
            "confidence",
            "warnings",
            "usage",
        }
        critic = httpx.post(f"{url}/v1/agents/critic/run", json={"input": {"draft": "x"}}).json()
        assert 1 <= critic["output"]["score"] <= 5 and critic["model_version"]["adapter"] is None
        batch = httpx.post(
            f"{url}/v1/agents/intent/run", json={"inputs": [{"text": r["text"]} for r in ROWS]}
        ).json()
        assert len(batch["data"]) == len(ROWS) and all(r["output"]["intent"] in "ABC" for r in batch["data"])

        good: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: good.append(
                httpx.post(f"{url}/v1/agents/intent/run", json={"input": {"text": "buy b"}}, timeout=60)
            )
        )
        worker.start()
        bad = {
            "wrong type": httpx.post(f"{url}/v1/agents/intent/run", json={"input": {"text": [1]}}),
            "missing field": httpx.post(
                f"{url}/v1/agents/intent/run", json={"inputs": [{"text": "a"}, {"txt": "b"}]}
            ),
            "unknown agent": httpx.post(f"{url}/v1/agents/nope/run", json={"input": {"text": "a"}}),
            "unavailable": httpx.post(f"{url}/v1/agents/broken/run", json={"input": {"text": "a"}}),
            "oversized batch": httpx.post(
                f"{url}/v1/agents/intent/run", json={"inputs": [{"text": "a"}] * 300}
            ),
            "over capacity": httpx.post(f"{url}/v1/agents/intent/run", json={"inputs": [{"text": "a"}] * 20}),
            "failing batch": httpx.post(f"{url}/v1/agents/flaky/run", json={"inputs": [{"text": "a"}] * 3}),
            "both": httpx.post(
                f"{url}/v1/agents/intent/run", json={"input": {"text": "a"}, "inputs": [{"text": "a"}]}
            ),
        }
        worker.join(60)
        failing = bad.pop("failing batch")
        assert failing.status_code == 200
        assert all("endpoint http://127.0.0.1:9 unreachable" in r["error"] for r in failing.json()["data"])
        codes = {k: (r.status_code, r.json()["error"]["message"]) for k, r in bad.items()}
        assert codes["over capacity"][0] == 400 and "admits at once (16)" in codes["over capacity"][1]
        assert codes["wrong type"][0] == 400 and "input.text: [1] is not of type" in codes["wrong type"][1]
        assert (
            codes["missing field"][0] == 400
            and "inputs[1]: 'text' is a required property" in codes["missing field"][1]
        )
        assert codes["unknown agent"][0] == 404 and "no agent 'nope'" in codes["unknown agent"][1]
        assert codes["unavailable"][0] == 503
        assert codes["oversized batch"][0] == 400 and "inputs" in codes["oversized batch"][1]
        assert codes["both"][0] == 400
        assert good and good[0].status_code == 200 and good[0].json()["output"]["intent"] in "ABC"
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "intent",
                "messages": [{"role": "user", "content": "Intent of: ask a"}],
                "max_tokens": 4,
            },
        )
        assert chat.status_code == 200 and chat.json()["system_fingerprint"] == "intent@v1"
        cited = httpx.post(f"{url}/v1/agents/cited/run", json={"input": {"text": "capital?"}}).json()
        assert cited["output"] == "Paris, not." and cited["fallback"]["kind"] == "stub"
        assert [(c["id"], c["known"], c["url"]) for c in cited["citations"]] == [
            ("wiki:Paris", True, "https://en.wikipedia.org/wiki/Paris"),
            ("wiki:Nowhere", False, None),
        ]
        assert cited["markdown"].startswith(
            "Paris [Paris](https://en.wikipedia.org/wiki/Paris), not [wiki:Nowhere]"
        )
        metrics = httpx.get(f"{url}/metrics").text
        assert 'loom_agent_runs_total{agent="intent",answered_by="adapter",confidence="high"}' in metrics
        assert 'loom_citations_unknown_sources_total{agent="cited"} 1.0' in metrics
        from typer.testing import CliRunner

        from loom.cli.main import app

        unknown = CliRunner().invoke(app, ["sources", "unknown", "--registry", str(registry), "--json"])
        assert [(u["id"], u["count"]) for u in json.loads(unknown.output)] == [("wiki:Nowhere", 1)]

        remote = load_agents(url=url)  # the same results, run by the server
        answered = remote["intent"].run({"text": "ask a"})
        assert answered.model_version["adapter"] == "intent@v1" and answered.output["intent"] in "ABC"
        assert [r.fallback.step for r in remote["intent"].run_many([{"text": "a"}, {"text": "b"}])] == [0, 0]
        with pytest.raises(LoomError, match=r"400 agent 'intent': input\.text"):
            remote["intent"].run({"text": [1]})

        # a remote Loom as a fallback endpoint: this server's chat route, model = the agent
        relay = {"adapter": "intent", "fallback": [{"endpoint": url, "model": "intent"}]}
        local = load_agents(write_map(tmp_path, {"relay": relay}), engine=agent_engine)["relay"]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RELAY_DISABLE_ADAPTER", "1")
            relayed = local.run({"text": "call c"})
        assert (relayed.fallback.step, relayed.fallback.kind) == (1, "endpoint")
        assert relayed.output["intent"] in "ABC" and relayed.model_version["model"] == "intent"


# ----------------------------------------------------------------- CLI
def test_cli_validates_lists_shows_and_runs(
    agent_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from loom.cli.main import app

    monkeypatch.setenv("LOOM_STORE", str(agent_store.url))
    good = write_map(tmp_path, {"intent": {"adapter": "intent"}, "broken": {"adapter": "no-such"}})
    runner = CliRunner()
    bad = runner.invoke(app, ["agents", "validate", str(good)])
    assert bad.exit_code == 2 and "✓ intent" in bad.output and "✗ broken" in bad.output
    assert "1 of 2 agents" in bad.output
    listed = json.loads(runner.invoke(app, ["agents", "ls", str(good), "--json"]).output)
    assert {a["name"]: a["status"] for a in listed} == {"intent": "ok", "broken": "error"}
    shown = json.loads(runner.invoke(app, ["agents", "show", "intent", "--map", str(good)]).output)
    assert shown["system_prompt"] == SYSTEM and shown["output"]["schema"]["properties"]["intent"]["enum"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ask a"}\n\n{"text": "buy b"}\n')
    ran = runner.invoke(
        app, ["agents", "run", "intent", "--map", str(good), "--input-file", str(rows), "--json"]
    )
    assert ran.exit_code == 0, ran.output
    results = [json.loads(line) for line in ran.output.splitlines() if line.startswith("{")]
    assert len(results) == 2 and all(r["output"]["intent"] in "ABC" for r in results)
    nope = runner.invoke(app, ["agents", "run", "intent", "--map", str(good), "--input", "[1]"])
    assert nope.exit_code == 2 and "--input: expected a JSON object" in nope.output


def test_the_plan_serves_the_first_variant_the_device_offers(agent_store: Store) -> None:
    from loom.serve.plan import plan_from_store

    cfg = ServeConfig(base="tiny", device="cpu", variant_preference=["int8", "fp16", "bf16", "fp32"])
    plan = plan_from_store(cfg, agent_store, [])
    assert plan.variant == "int8"  # Loom's own CPU variant (loom.models.quantize), made on first load
    cfg = ServeConfig(base="tiny", device="cpu", variant_preference=["nf4", "fp16", "bf16", "fp32"])
    plan = plan_from_store(cfg, agent_store, [])
    assert plan.dtype == "bfloat16"  # nf4: bitsandbytes on CUDA only; fp16: CUDA only
    assert any("variant_preference" in n and "nf4" in n for n in plan.notes), plan.notes
    assert plan_from_store(ServeConfig(base="tiny", device="cpu"), agent_store, []).dtype == "float32"


def test_a_templated_text_answer_is_decoded_under_its_template(agent_engine: Engine) -> None:
    """Training wrote ``{answer} <<SRC:squad:{passage_id}>>``: the citation is the payload's own
    passage id, character for character; only the answer is free."""
    import re

    from loom.agents.prompting import AgentPrompt

    prompt = AgentPrompt(
        "s", "P {passage_id}: {context}\nQ: {question}", "{answer} <<SRC:squad:{passage_id}>>"
    )
    payload = {"passage_id": "Sky_(United_Kingdom)#p2", "context": "c", "question": "q"}
    pattern = prompt.answer_pattern(payload)
    assert pattern is not None and re.fullmatch(pattern, "in 1990 <<SRC:squad:Sky_(United_Kingdom)#p2>>")
    assert not re.fullmatch(pattern, "in 1990 <<SRC:squad:Sky_(United_Kingdom)#p3>>")
    agent_engine.regex_processor(pattern)  # llguidance compiles it
    assert AgentPrompt("s", "{text}", '{{"intent": "{label}"}}').answer_pattern({"text": "x"}) is None
