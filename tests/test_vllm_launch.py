"""The vLLM backend's pieces that need no vLLM: the command line from the plan, the request
body, output assembly, metric relabelling, and the CLI's dry run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from loom.cli.main import app
from loom.engine.types import SamplingParams
from loom.errors import LoomError
from loom.serve.plan import ServePlan
from loom.store import Store
from loom.vllm.launch import check_python, kv_cache_gib, vllm_dtype, vllm_rank
from loom.vllm.metrics import relabel
from loom.vllm.options import VLLMOptions
from loom.vllm.requests import GuidedDecoding, Tally, completion_body
from loom.vllm.start import launch_for


def _plan(**kw: object) -> ServePlan:
    base = dict(
        base_ref="b@v1",
        device="cpu",
        variant="fp32",
        dtype="float32",
        budget_mb=8000,
        weights_mb=600,
        adapter_slots=16,
        adapter_slot_mb=30.0,
        kv_cache_mb=1441,
        prefix_cache_mb=256,
        kv_sequences=32,
        max_batch_size=32,
        max_seq_len=1024,
        max_rank=48,
        activations_mb=90,
        runtime_mb=400,
    )
    return ServePlan(**{**base, **kw})  # type: ignore[arg-type]


def test_launch_follows_the_plan(tmp_path: Path) -> None:
    opts = VLLMOptions(port=9999, tensor_parallel_size=2, extra_args=["--enforce-eager"])
    launch = launch_for(_plan(), tmp_path, opts, sys.executable)
    launch.lora_modules = {"intent@v3": tmp_path / "a"}
    args = launch.args()
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert flag["--model"] == str(tmp_path) and flag["--served-model-name"] == "b@v1"
    assert flag["--max-model-len"] == "1024" and flag["--max-num-seqs"] == "32"
    assert flag["--max-lora-rank"] == "64"  # 48 rounded up to a rank vLLM accepts
    assert flag["--max-loras"] == "16" and flag["--max-cpu-loras"] == "16"
    assert flag["--tensor-parallel-size"] == "2" and flag["--port"] == "9999"
    assert flag["--lora-modules"] == f"intent@v3={tmp_path / 'a'}"
    assert args[-1] == "--enforce-eager" and "--enable-lora" in args
    env = launch.env({})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["HF_HUB_OFFLINE"] == "1"
    # under Loom, vLLM runs behind the parent-death watchdog, the same arguments after it
    cmd = launch.command(parent_pid=1234)
    assert cmd[1] == "-c" and cmd[3] == "1234" and cmd[4:] == args
    assert launch.command()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_limits_and_bad_settings_name_the_fix(tmp_path: Path) -> None:
    assert [vllm_rank(r) for r in (1, 2, 16, 17, 64, 65, 512)] == [1, 8, 16, 32, 64, 128, 512]
    with pytest.raises(LoomError, match="--max-lora-rank"):
        vllm_rank(513)
    assert [kv_cache_gib(m) for m in (1, 1024, 1025, 4096)] == [1, 1, 2, 4]
    assert vllm_dtype("torch.bfloat16") == "bfloat16"
    with pytest.raises(LoomError, match="float32, bfloat16 or float16"):
        vllm_dtype("nf4")
    with pytest.raises(LoomError, match="make vllm"):
        check_python(str(tmp_path / "nope" / "python"))


def test_request_body_carries_sampling_and_constraints() -> None:
    params = SamplingParams(max_new_tokens=7, temperature=0.5, top_k=4, seed=3, stop=["\n"])
    body = completion_body("a@v1", [1, 2], params, GuidedDecoding("json", {"type": "object"}), stream=True)
    assert body["prompt"] == [1, 2] and body["max_tokens"] == 7 and body["top_k"] == 4 and body["seed"] == 3
    assert body["structured_outputs"] == {"json": {"type": "object"}} and body["stop"] == ["\n"]
    assert body["stream_options"] == {"include_usage": True} and body["return_token_ids"] is True
    plain = completion_body("b", [1], SamplingParams(), None, stream=False)
    assert "top_k" not in plain and "seed" not in plain and "structured_outputs" not in plain
    assert GuidedDecoding("json_object").structured_outputs() == {"json_object": True}
    assert GuidedDecoding("regex", "a+").structured_outputs() == {"regex": "a+"}


def test_tally_assembles_a_completion() -> None:
    tally = Tally("r1", 5, "a@v1", 0.0)
    first = tally.add({"text": "He", "token_ids": [10, 11]})
    tally.add({"text": "llo", "token_ids": [12], "finish_reason": "length"})
    done = tally.completion()
    assert (first.text, first.token_ids) == ("He", [10, 11])
    assert (done.text, done.token_ids, done.finish_reason, done.adapter) == (
        "Hello",
        [10, 11, 12],
        "length",
        "a@v1",
    )
    failed = Tally("r2", 5, None, 0.0).completion("vLLM answered 400: bad", "input")
    assert failed.finish_reason == "error" and failed.error_kind == "input"


def test_metrics_are_relabelled() -> None:
    text = (
        "# HELP vllm:num_requests_running Requests running\n# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="b"} 3.0\n'
        "# HELP vllm:prompt_tokens Prompt tokens\n# TYPE vllm:prompt_tokens counter\n"
        'vllm:prompt_tokens_total{model_name="b"} 42.0\n'
    )
    families = [relabel(f) for f in text_string_to_metric_families(text)]
    names = {s.name: s.value for f in families for s in f.samples}
    assert names == {"loom_vllm_num_requests_running": 3.0, "loom_vllm_prompt_tokens_total": 42.0}


def test_dry_run_prints_the_vllm_command(engine_store: Store) -> None:
    args = ["serve", "--backend", "vllm", "--dry-run", "--json", "--base", "tiny@v1", "--preload", "qv4"]
    result = CliRunner().invoke(app, args, env={"LOOM_STORE": engine_store.url})
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["backend"] == "vllm"
    assert "--lora-modules qv4@v1=" in out["vllm_command"] and "--enable-lora" in out["vllm_command"]
    bad = CliRunner().invoke(app, ["serve", "--backend", "tgi", "--dry-run"])
    assert bad.exit_code != 0 and "give loom or vllm" in bad.output
    missing = CliRunner().invoke(app, ["serve", "--backend", "vllm", "--vllm-python", "/nonexistent/python"])
    assert missing.exit_code != 0 and "make vllm" in missing.output  # before anything starts
