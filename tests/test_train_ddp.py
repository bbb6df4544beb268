"""``loom train`` as a real 2-process data-parallel job: `accelerate launch` with the shipped
CPU config (torchrun, gloo) on the tiny random Mistral.

- the adapter equals a single-process run's on the same global batch;
- only rank 0 snapshots the data and publishes (one snapshot, one version);
- a rank SIGKILLed after training, before the publish barrier, fails the job (non-zero exit)
  and leaves no adapter version and nothing staged in the store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loom.errors import LoomError
from loom.store import Store
from loom.store.importers import import_hf_dir
from loom.train.config import TrainConfig
from loom.train.ranks import TEST_FAIL_RANK
from loom.train.run import _output_dir, train

CONFIG = Path(__file__).parents[1] / "examples" / "accelerate" / "ddp_cpu_2proc.yaml"
ROWS = [{"prompt": f"play song {i}", "response": '{"intent": "PlayMusic"}'} for i in range(12)] + [
    {"prompt": f"weather in city {i}", "response": '{"intent": "GetWeather"}'} for i in range(12)
]
# Same data, seed, steps and global batch (2 ranks x 2 = 1 x 4); no dropout, so nothing random
# differs between the two runs.
SETTINGS = dict(max_steps=3, learning_rate=0.01, adapter_r=4, adapter_dropout=0.0, seed=7)
GLOBAL_BATCH, RANKS = 4, 2
# Both runs do the same fp32 arithmetic except the order of sums: each rank's gradient over its
# 2 rows, all-reduced, against one sum over 4 rows, and shorter padding per rank. That moves
# results by fp32 rounding, ~1e-7 on weights of ~0.01-0.1 (measured: max 1e-7); Adam's
# division by sqrt(v) can amplify it where gradients are tiny, hence 100x headroom. Training on
# other rows or another global batch moves the weights by ~1e-3, far above it.
ATOL = 1e-5
ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _store(root: Path, tiny_dir: Path) -> tuple[Store, Path]:
    store = Store(root / "store")
    import_hf_dir(store, tiny_dir, "tiny-mistral", version="v1", alias="current")
    store.set_default_base("tiny-mistral")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return store, data


def _launch(store: Store, data: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file ddp_cpu_2proc.yaml -m loom train ...`, two ranks."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    cmd = [
        "timeout", "-k", "10", "150",  # the whole process group: launcher and both ranks
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIG), "--main_process_port", str(_free_port()),
        "-m", "loom", "train", "--device", "cpu", "--train-files", str(data),
        "--train-batch-size", str(GLOBAL_BATCH // RANKS), "--output_dir", str(out),
        "--agent", "intent", "--adapter-name", "intent-ddp", "--publish", "--adapter-version", "v1",
        "--json", *args,
    ]  # fmt: skip
    full_env = {
        **os.environ,
        "LOOM_STORE": store.url,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=180)


def _versions(store: Store, kind: str) -> list[str]:
    return [f"{a.name}@{v}" for a in store.artifacts() if a.kind == kind for v in store.versions(a)]


def _nothing_partial(root: Path) -> None:
    """Every version folder on disk is a complete, visible version; no staging is left over."""
    staged = list((root / ".staging").iterdir()) if (root / ".staging").is_dir() else []
    assert staged == [], staged
    for folder in root.glob("**/versions/*"):
        assert (folder / "manifest.json").is_file(), f"partial version {folder}"


def test_two_ranks_train_like_one_and_only_rank0_publishes(tiny_dir: Path, tmp_path: Path) -> None:
    # the single-process reference, in its own store: same rows, same global batch
    ref_store, ref_data = _store(tmp_path / "ref", tiny_dir)
    train(
        TrainConfig(
            train_files=[str(ref_data)],
            device="cpu",
            train_batch_size=GLOBAL_BATCH,
            output_dir=tmp_path / "ref-run",
            **SETTINGS,  # type: ignore[arg-type]
        ),
        ref_store,
    )
    store, data = _store(tmp_path / "ddp", tiny_dir)
    done = _launch(store, data, tmp_path / "ddp-run", {})
    assert done.returncode == 0, done.stderr[-4000:]

    # (a) the same adapter as one process on the same global batch
    one = load_file(tmp_path / "ref-run" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ddp-run" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= ATOL, f"2-rank adapter differs from the 1-process one by {worst:.3g} > {ATOL}"

    # (b) rank 0 alone snapshotted and published; rank 0 alone reported
    summary = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing
    assert summary["status"] == "completed" and summary["steps"] == SETTINGS["max_steps"]
    assert _versions(store, "dataset") == [summary["data"]["snapshot"]]
    assert _versions(store, "adapter") == ["intent-ddp@v1"]
    written = json.loads((tmp_path / "ddp-run" / "training_summary.json").read_text())
    assert written["data"]["snapshot"] == summary["data"]["snapshot"]  # not rank 1's copy
    _nothing_partial(Path(store.url))


def test_a_rank_killed_before_publishing_fails_the_job_and_publishes_nothing(
    tiny_dir: Path, tmp_path: Path
) -> None:
    store, data = _store(tmp_path, tiny_dir)
    done = _launch(store, data, tmp_path / "run", {TEST_FAIL_RANK: "1"})
    assert done.returncode != 0, "the job succeeded though rank 1 was killed"
    assert "SIGKILL" in done.stderr and "rank      : 1" in done.stderr, done.stderr[-3000:]
    assert _versions(store, "adapter") == [], "a version was published by a job that failed"
    # rank 0's dataset snapshot, taken before training, is complete and reused by a rerun
    assert len(_versions(store, "dataset")) <= 1
    _nothing_partial(Path(store.url))


def test_several_ranks_need_one_output_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LoomError, match="under 2 processes needs --output_dir"):
        _output_dir(TrainConfig(adapter_name="intent"))


@pytest.mark.parametrize(("env", "name"), [({"ACCELERATE_USE_FSDP": "true"}, "FSDP"), (ZERO3, "ZeRO-3")])
def test_qlora_under_a_sharding_launch_is_refused_before_the_store_is_touched(
    env: dict[str, str], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = Store(tmp_path / "store")
    cfg = TrainConfig(train_files=[str(tmp_path / "x.jsonl")], qlora=True, output_dir=tmp_path / "run")
    with pytest.raises(LoomError, match=f"--qlora under {name}: .*ddp\\.yaml"):
        train(cfg, store)
    assert not (tmp_path / "store").exists()
