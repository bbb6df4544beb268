"""Integration: the embedded SmolLM2 default base, imported from its GGUF file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loom.cli.main import app
from loom.store import Store

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_import_default_then_verify_and_show(default_store: Store) -> None:
    root = default_store.url
    verify = runner.invoke(app, ["store", "verify", "--store", root])
    # the store is session-wide: other integration tests may have added adapters to it
    assert verify.exit_code == 0 and re.search(r"\b\d+ ok, 0 with problems", verify.output), verify.output
    shown = json.loads(
        runner.invoke(app, ["store", "show", "smollm2-135m-instruct", "--json", "--store", root]).output
    )
    base = shown["base"]
    assert shown["version"].startswith("v") and shown["license"] == "Apache-2.0"
    assert base["arch"]["model_type"] == "llama" and base["has_chat_template"]
    # 134.5M fp32 parameters ≈ 513 MiB of weights; the estimate is computed from them
    assert 134_000_000 < base["parameter_count"] < 135_000_000
    assert 513 <= base["approx_vram_mb"] < 700
    assert default_store.default_base() == "smollm2-135m-instruct"


def test_default_base_answers_a_chat_message(default_store: Store) -> None:
    import torch

    from loom.models import load_model

    loaded = load_model(store=default_store, device="cpu")  # the store's default base
    tok = loaded.tokenizer
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


def test_default_files_are_safetensors_only(default_store: Store) -> None:
    r = default_store.resolve("smollm2-135m-instruct")
    names = {f.path for f in r.manifest.files}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".gguf")) for n in names)
    assert Path(default_store.backend.local_path(r.rel), "tokenizer.json").is_file()


def test_train_dry_run_on_snips(default_store: Store, tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips_intent" / "train.jsonl"
    if not data.is_file():
        pytest.skip("shared data not present")
    out = tmp_path / "dry"
    result = runner.invoke(
        app,
        [
            "train",
            "--dry-run",
            "--store",
            default_store.url,
            "--train-files",
            str(data),
            "--input-template",
            "Intent of: {text}",
            "--output-template",
            '{{"intent": "{label}"}}',
            "--agent",
            "intent",
            "--adapter-name",
            "snips-intent",
            "--output_dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "«" in result.output and "AddToPlaylist" in result.output  # the decoded mask is shown
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "dry_run" and summary["data"]["rows_used"] == 2000
    assert summary["base"]["ref"].startswith("smollm2-135m-instruct@")
    assert summary["prompting"]["uses_chat_template"] is True
