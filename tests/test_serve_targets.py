"""Serve what is stored: a default ``loom serve`` holds LoRA slots for every projection and rank the
stored adapters for its base use (ranks 4 to 64, attention and MLP projections), answers a mixed
burst of them with PEFT's greedy tokens, counts their memory in the plan, and refuses an adapter
beyond explicit ``--lora-targets``/``--max-lora-rank`` with an error naming the flag."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from helpers import import_retemplated_base, make_lora_adapter
from typer.testing import CliRunner

from loom.cli.main import app
from loom.engine.runner import ATTN_TARGETS, MLP_TARGETS
from loom.errors import LoomError
from loom.serve import ServeConfig, create_app
from loom.serve.lora_limits import StoredAdapter, adapter_projections, choose_lora
from loom.serve.plan import MIB, plan_from_store
from loom.serve.server import serve_in_thread
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.importers import import_hf_dir

ALL = ATTN_TARGETS + MLP_TARGETS
MIXED = {  # name: (seed, rank, targets)
    "r4qv": (21, 4, ("q_proj", "v_proj")),
    "r16oup": (22, 16, ("o_proj", "up_proj")),
    "r32gd": (23, 32, ("gate_proj", "down_proj")),
    "r64all": (24, 64, ALL),
}
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 8, 250, 61, 3]]  # token ids: no tokenizer choices involved
runner = CliRunner()


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Store:
    """``tiny@v1`` with the MIXED adapters, plus a rank-128 adapter for another base (same shapes,
    other fingerprint) that must not count toward tiny's defaults."""
    root = tmp_path_factory.mktemp("targets")
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny", version="v1", alias="current")
    for name, (seed, r, targets) in MIXED.items():
        folder = make_lora_adapter(tiny_dir, root / name, seed=seed, r=r, targets=targets)
        publish_adapter(store, folder, agent="mix", name=name, base="tiny@v1", version="v1", alias="current")
    other = import_retemplated_base(store, "tiny@v1", root, "tiny-other")
    big = make_lora_adapter(tiny_dir, root / "big", seed=25, r=128, targets=("q_proj", "down_proj"))
    publish_adapter(store, big, agent="other", name="big", base=other, version="v1", alias="current")
    return store


def cpu(**kwargs: object) -> ServeConfig:
    return ServeConfig(base="tiny", device="cpu", **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------- the plan


def test_defaults_come_from_the_stored_adapters_for_the_base(mixed_store: Store, engine_store: Store) -> None:
    plan = plan_from_store(cpu(), mixed_store, [])
    assert plan.lora_targets == list(ALL)  # the union of what tiny's four adapters target
    assert plan.max_rank == 64  # not 128: that adapter is for another base
    assert "4 stored adapters for this base" in plan.lora_reason
    assert any(
        "rank 64 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in n for n in plan.notes
    )
    assert plan.engine_config().lora_targets == ALL and plan.engine_config().max_rank == 64
    # attention-only adapters of rank <= 8: q/k/v/o (what training targets by default), rank 64 at least
    attn = plan_from_store(cpu(), engine_store, [])
    assert attn.lora_targets == list(ATTN_TARGETS) and attn.max_rank == 64
    # a stored adapter above the floor sets the rank; manifests may spell targets PEFT's ways
    wide = choose_lora(cpu(), [StoredAdapter("x@v1", 128, frozenset({"down_proj"}))])
    assert wide.rank == 128 and wide.targets == (*ATTN_TARGETS, "down_proj")
    assert adapter_projections(["all-linear"]) == frozenset(ALL)
    assert adapter_projections(["self_attn.o_proj", r".*\.(q_proj|down_proj)"]) == {
        "o_proj",
        "q_proj",
        "down_proj",
    }


def test_flags_override_the_defaults_and_keep_the_old_name(mixed_store: Store) -> None:
    plan = plan_from_store(cpu(lora_targets=["v_proj,q_proj"], max_lora_rank=8), mixed_store, [])
    assert plan.lora_targets == ["q_proj", "v_proj"] and plan.max_rank == 8
    beyond = next(n for n in plan.notes if "need more" in n)
    assert "3 stored adapter(s)" in beyond and "r32gd@v1 (rank 32, gate_proj, down_proj)" in beyond
    env = {"LOOM_STORE": mixed_store.url}
    base = ["serve", "--dry-run", "--base", "tiny", "--device", "cpu"]
    for rank_flag in ("--max-lora-rank", "--max-rank"):
        out = runner.invoke(
            app, [*base, "--json", "--lora-targets", "q_proj,down_proj", rank_flag, "32"], env=env
        )
        assert out.exit_code == 0, out.output
        got = json.loads(out.output)
        assert got["lora_targets"] == ["q_proj", "down_proj"] and got["max_rank"] == 32
    table = runner.invoke(app, base, env={**env, "COLUMNS": "400"})  # wide: rows are not wrapped
    assert table.exit_code == 0, table.output
    flat = " ".join(table.output.split())
    assert "max_lora_rank │ 64 │" in flat and f"lora_targets │ {', '.join(ALL)} │" in flat
    assert "every projection the 4 stored adapters for this base target; rank: the largest among" in flat
    bad = runner.invoke(app, [*base, "--lora-targets", "q_proj,lm_head"], env=env)
    assert bad.exit_code == 2 and "--lora-targets: 'lm_head' is not a projection" in bad.output
    with pytest.raises(LoomError, match="--max-lora-rank 0: give a positive rank"):
        plan_from_store(cpu(max_lora_rank=0), mixed_store, [])


def test_plan_counts_the_memory_of_the_served_targets(mixed_store: Store) -> None:
    arch = mixed_store.resolve("tiny").manifest.base.arch  # type: ignore[union-attr]
    h, mlp = arch.hidden_size, arch.hidden_size + arch.intermediate_size
    kv = arch.num_key_value_heads * h // arch.num_attention_heads
    attn_dims, all_dims = 2 * h + 2 * (h + kv) + 2 * h, 2 * h + 2 * (h + kv) + 2 * h + 3 * mlp

    def slot_mb(dims: int, rank: int, slots: int = 16) -> float:  # fp32; +1 all-zero slot
        return round(arch.num_hidden_layers * dims * rank * 4 / MIB * (1 + 1 / slots), 2)

    default = plan_from_store(cpu(), mixed_store, [])
    assert default.adapter_slot_mb == slot_mb(all_dims, 64)
    attn = plan_from_store(cpu(lora_targets=list(ATTN_TARGETS), max_lora_rank=64), mixed_store, [])
    assert attn.adapter_slot_mb == slot_mb(attn_dims, 64) < default.adapter_slot_mb
    # the over-commit refusal names the LoRA flags among the levers
    with pytest.raises(LoomError, match=r"over by .*--max-lora-rank \(now 64\), --lora-targets"):
        plan_from_store(cpu(memory_mb=10), mixed_store, [])


# ----------------------------------------------------------------- served by HTTP


def peft_reference(store: Store, adapter: str | None, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    from loom.models import load_model

    loaded = load_model("tiny@v1", [adapter] if adapter else [], store=store, device="cpu")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = loaded.model.generate(  # type: ignore[attr-defined]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=sorted(eos),
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="module")
def default_server(mixed_store: Store) -> Iterator[tuple[str, object]]:
    application = create_app(cpu(), store=mixed_store)  # no targets, no rank: the plan decides
    with serve_in_thread(application) as url:
        yield url, application.state.service


def test_default_server_answers_a_mixed_burst_like_peft(
    default_server: tuple[str, object], mixed_store: Store
) -> None:
    url, service = default_server
    engine = service.engine  # type: ignore[attr-defined]
    assert engine.config.lora_targets == ALL and engine.config.max_rank == 64
    jobs = [(f"{name}", p) for name in MIXED for p in PROMPTS] + [("tiny", PROMPTS[0])]
    body = {"max_tokens": 10, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            calls = [client.post("/v1/completions", json={**body, "model": m, "prompt": p}) for m, p in jobs]
            return list(await asyncio.gather(*calls))

    answers = asyncio.run(burst())
    eos = engine.scheduler.eos_ids
    for (model, prompt), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, (model, answer.text)
        adapter = None if model == "tiny" else f"{model}@v1"
        want = peft_reference(mixed_store, adapter, prompt, 10, eos)
        got = answer.json()
        text = engine.tokenizer.decode([t for t in want if t not in eos])
        assert got["choices"][0]["text"] == text, (model, prompt)
        assert got["usage"]["completion_tokens"] == len(want), (model, prompt)


def test_an_adapter_beyond_the_limits_is_refused_naming_the_flag(mixed_store: Store) -> None:
    cfg = cpu(lora_targets=list(ATTN_TARGETS), max_lora_rank=16)
    with serve_in_thread(create_app(cfg, store=mixed_store)) as url:
        ok = httpx.post(
            f"{url}/v1/completions", json={"model": "r4qv", "prompt": PROMPTS[0], "max_tokens": 2}
        )
        assert ok.status_code == 200, ok.text
        bad = httpx.post(
            f"{url}/v1/completions", json={"model": "r32gd", "prompt": PROMPTS[0], "max_tokens": 2}
        )
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["code"] == "incompatible_adapter" and error["param"] == "model"
        assert error["message"].startswith(
            "adapter r32gd@v1: rank 32 exceeds the server's --max-lora-rank 16; "
        )
        assert "restart with --max-lora-rank 32" in error["message"]
        assert "targets gate_proj, down_proj, which this server does not serve" in error["message"]
        assert "restart with --lora-targets including gate_proj,down_proj" in error["message"]
        up = httpx.post(f"{url}/generate", json={"adapter": "r16oup", "prompt": "hi", "max_tokens": 2})
        assert up.status_code == 400
        message = up.json()["error"]["message"]
        assert message == (
            "adapter r16oup@v1: targets up_proj, which this server does not serve (it serves q_proj, "
            "k_proj, v_proj, o_proj); restart with --lora-targets including up_proj"
        )
        # every other way in is checked the same way, before any file is fetched
        load = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "r32gd"})
        pool = httpx.post(f"{url}/workers/pools", json={"adapter": "r16oup", "warm_size": 1})
        for refused in (load, pool):
            assert refused.status_code == 400, refused.text
            assert "restart with --lora-targets including" in refused.json()["error"]["message"]
