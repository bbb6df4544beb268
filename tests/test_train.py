"""loom train on the tiny random Mistral: masking, dry run, a real short run, publish, load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loom.cli.main import app
from loom.data.formats import Example
from loom.errors import LoomError
from loom.store import Store
from loom.train.config import TrainConfig, load_config
from loom.train.run import train
from loom.train.tokenize import IGNORE, MaskingError, check_masks, tokenize_examples

runner = CliRunner()
ROWS = [{"prompt": f"play song {i}", "response": '{"intent": "PlayMusic"}'} for i in range(12)] + [
    {"prompt": f"weather in city {i}", "response": '{"intent": "GetWeather"}'} for i in range(12)
]


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return f


def test_mask_covers_response_and_end_of_turn_only(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ex = Example(
        id="x",
        source="t",
        messages=[
            {"role": "user", "content": "play jazz"},
            {"role": "assistant", "content": "ok"},
        ],
    )
    (item,) = tokenize_examples([ex], tok, max_len=128)
    trained = [i for i, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE]
    assert tok.decode(trained) == "ok<|im_end|>\n"
    assert tok.eos_token_id in trained  # the model learns to stop
    prompt = [i for i, label in zip(item.input_ids, item.labels, strict=True) if label == IGNORE]
    assert "play jazz" in tok.decode(prompt) and "ok" not in tok.decode(prompt)


def test_masking_check_fails_on_empty_responses(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    empty = [
        Example(
            id=f"row{i}",
            source="t",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": ""},
            ],
        )
        for i in range(3)
    ]
    with pytest.raises(MaskingError) as err:
        check_masks(tokenize_examples(empty, tok, max_len=64), tok)
    text = str(err.value)
    assert "3 of 3 examples have no supervised tokens" in text and "row0" in text
    assert "«<|im_end|>\n»" in text  # the decoded example shows what would be trained


def test_training_on_a_dataset_with_empty_responses_fails_before_training(
    store: Store, tiny_base: str, tmp_path: Path
) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "q", "response": ""}) for _ in range(3)) + "\n")
    with pytest.raises(LoomError, match=r"empty\.jsonl:1: field 'response': is empty"):
        train(TrainConfig(train_files=[str(f)], dry_run=True, output_dir=tmp_path / "o"), store)


def test_truncation_that_hides_every_response_is_caught(
    store: Store, tiny_base: str, train_file: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        train_files=[str(train_file)], max_seq_length=4, dry_run=True, output_dir=tmp_path / "o"
    )
    with pytest.raises(MaskingError, match="raise --max-seq-length"):
        train(cfg, store)


def test_dry_run_writes_summary_and_trains_nothing(
    store: Store, tiny_base: str, train_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dry"
    result = runner.invoke(
        app,
        [
            "train",
            "--dry-run",
            "--train-files",
            str(train_file),
            "--output_dir",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "dry_run" and summary["base"]["ref"] == tiny_base
    assert summary["data"]["train_examples"] == 24 and summary["data"]["supervised_tokens"] > 0
    assert summary["estimate"]["total_mb"] > 0
    assert not (out / "adapter_model.safetensors").exists()
    assert store.summaries("dataset") == []  # a dry run publishes nothing


def test_qlora_without_cuda_is_a_clear_error(store: Store, tiny_base: str, train_file: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(LoomError, match="--qlora needs a CUDA GPU"):
        train(TrainConfig(train_files=[str(train_file)], qlora=True, dry_run=True), store)


def test_yaml_config_and_flag_override(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("adapter-r: 4\nlearning_rate: 0.01\ntarget-modules: q_proj,v_proj\n")
    cfg = load_config(cfg_file, {"adapter_r": 8, "epochs": None})
    assert (cfg.adapter_r, cfg.learning_rate, cfg.target_modules) == (8, 0.01, ["q_proj", "v_proj"])
    cfg_file.write_text("adapter_rank: 4\n")
    with pytest.raises(LoomError, match="--adapter-rank: Extra inputs"):
        load_config(cfg_file, {})


def test_train_publish_load_changes_output(
    store: Store, tiny_base: str, train_file: Path, tmp_path: Path
) -> None:
    from loom.models import load_model

    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--train-files",
            str(train_file),
            "--output_dir",
            str(out),
            "--max-steps",
            "4",
            "--train-batch-size",
            "4",
            "--learning-rate",
            "0.01",
            "--adapter-r",
            "4",
            "--val-split",
            "0.25",
            "--agent",
            "intent",
            "--adapter-name",
            "intent-lora",
            "--publish",
            "--adapter-version",
            "v1",
            "--seed",
            "7",
            "--json",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_summary.json",
        "loss.csv",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["final_eval_loss"] is not None and summary["tokens_per_second"] > 0
    assert summary["data"]["snapshot"].startswith("intent-lora-data@")
    m = store.resolve("intent-lora").manifest  # no --alias: the first version is current
    assert m.adapter and m.adapter.base_ref == tiny_base and m.training_summary
    assert m.training_summary["base"]["fingerprint"] == m.adapter.base_fingerprint
    assert m.source.type == "training_run"

    base = load_model(tiny_base, store=store, device="cpu")
    tuned = load_model(tiny_base, ["intent-lora"], store=store, device="cpu")
    ids = base.tokenizer("play song 3", return_tensors="pt")
    with torch.no_grad():
        a = base.model(**ids).logits
        b = tuned.model(**ids).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_packed_examples_do_not_attend_to_each_other(tiny_dir: Path) -> None:
    """The padding-free packing path relies on transformers building a block-diagonal
    mask from position_ids; with use_cache off (as loom train sets it) it must."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model.config.use_cache = False
    a, b = [5, 17, 42, 8, 99], [7, 23, 11]
    packed = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    from helpers import Fp32Reference

    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions).logits[0, len(a) :]
    Fp32Reference(model, input_ids=torch.tensor([b])).check(together, 0, "packed example")


def test_packed_steps_hold_the_examples_a_padded_batch_would() -> None:
    """Each optimizer step trains a fixed number of shuffled examples, packed whole into
    rows, every step topped up to the same number of rows with label-free rows. Packing
    by tokens instead gave steps 3 to 13 examples (the packed-loss gap)."""
    from loom.train.packing import StepBlockSampler
    from loom.train.tokenize import Tokenized
    from loom.train.trainer import _packed_steps

    lengths = [6] * 30 + [40] * 10  # short and long examples, like SNIPS next to SQuAD
    items = [Tokenized(str(i), list(range(n)), [-100] * (n - 1) + [i]) for i, n in enumerate(lengths)]
    data, blocks, width = _packed_steps(items, examples_per_step=8, row_tokens=48, seed=0, pad_id=0)
    assert len(blocks) == 5 and all(len(b) == width for b in blocks)
    for block in blocks:
        rows = [data[i] for i in block]
        assert all(len(r["input_ids"]) <= 48 and sum(r["seq_lengths"]) == len(r["input_ids"]) for r in rows)
        trained = [x for r in rows for x in r["labels"] if x != -100]
        assert len(trained) == 8  # eight whole examples per step, whatever their lengths
    supervised = sorted(x for r in data for x in r["labels"] if x != -100)
    assert supervised == list(range(len(items)))  # every example exactly once, never split
    fillers = [r for r in data if r["labels"] == [-100]]
    assert fillers and all(r["input_ids"] == [0] and r["seq_lengths"] == [1] for r in fillers)
    again, _, _ = _packed_steps(items, 8, 48, seed=0, pad_id=0)
    assert again["seq_lengths"] == data["seq_lengths"]  # deterministic

    sampler = StepBlockSampler(blocks, seed=0)
    first = list(sampler)
    assert first == [i for b in blocks for i in b] and len(sampler) == len(first)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == sorted(first) and second != first
    chunks = [second[k : k + width] for k in range(0, len(second), width)]
    assert sorted(chunks) == sorted(blocks)  # blocks move as a whole, rows stay together


def test_packing_refuses_an_example_longer_than_a_row() -> None:
    from loom.train.packing import pack_groups

    with pytest.raises(ValueError, match="example 1 has 50 tokens"):
        pack_groups([10, 50], examples_per_step=2, row_tokens=48, seed=0)


def test_packed_training_runs_one_step_per_group_of_examples(
    store: Store, tiny_base: str, train_file: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        train_files=[str(train_file)],
        model_name_or_path=tiny_base,
        output_dir=tmp_path / "packed",
        packing=True,
        epochs=2,
        train_batch_size=5,
        max_seq_length=64,
        adapter_r=4,
        learning_rate=0.01,
        seed=3,
    )
    summary = train(cfg, store).summary
    # 24 examples in groups of 5 → 5 optimizer steps an epoch, whatever the rows.
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert summary["epochs_done"] == pytest.approx(2.0)
    loss = summary["final_train_loss"]
    assert loss is not None and loss == loss  # finite: filler rows add no NaN
    assert summary["tokens_seen"] == 2 * summary["data"]["tokens"]  # filler rows are not counted
