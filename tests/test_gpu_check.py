"""scripts/gpu_check.sh and gpu_wheels.sh stay runnable where no GPU is: the GPU check is
run rarely (when a session is lent a GPU), so CI checks its syntax, its --dry-run (files,
every CLI flag it passes, its Python helpers) and that a flag the CLI lacks fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loom.testing import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "gpu_check.sh"
WHEELS = REPO / "scripts" / "gpu_wheels.sh"
STEPS = ("setup", "random-base", "engine-bench", "qlora-train", "serve-openai")


def _run(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script sets its own
    return subprocess.run(
        ["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel folder as gpu_wheels.sh leaves it: wheels (names only: a dry run installs
    nothing) and the tokenizer the random base borrows."""
    folder = tmp_path_factory.mktemp("wheels")
    (folder / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl").write_bytes(b"")
    make_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


def _dry_run(script: Path, wheels: Path, work: Path) -> subprocess.CompletedProcess[str]:
    return _run(script, "--dry-run", "--python", sys.executable, "--wheels", wheels, "--work", work)


def test_scripts_parse_and_explain_themselves() -> None:
    for script in (CHECK, WHEELS):
        assert _run("-n", script).returncode == 0
        shown = _run(script, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "--dry-run" in shown.stdout or "--list" in shown.stdout
    assert all(step in _run(CHECK, "--help").stdout for step in STEPS)
    wrong = _run(CHECK, "--no-such-flag")
    assert wrong.returncode == 2 and "--no-such-flag" in wrong.stderr


def test_dry_run_prints_every_step_and_passes_its_checks(wheels: Path, tmp_path: Path) -> None:
    done = _dry_run(CHECK, wheels, tmp_path / "work")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "dry run: all checks passed" in out
    for step in STEPS:
        assert f"== {step} (limit " in out, step
        assert any(line.startswith(step) and "dry-run" in line for line in out.splitlines()), step
    # the commands, with their resolved paths
    assert f"--target {tmp_path / 'work' / 'site'}" in out and f"{wheels}/*.whl" in out
    assert f"{REPO}/benchmarks/random_base.py --shape mistral-7b" in out
    assert f"--tokenizer {wheels / 'tokenizer'}" in out
    assert f"{REPO}/benchmarks/engine.py --base mistral-7b-random@v1 --device cuda --dtype bfloat16" in out
    train = next(line for line in out.splitlines() if line.startswith("== qlora-train"))
    assert " -m loom train " in train and "--qlora" in train and "--publish" in train
    serve = next(line for line in out.splitlines() if line.startswith("== serve-openai"))
    assert " -m loom serve " in serve and serve.count("--preload") == 2
    for check in ("loom train flags", "loom serve flags", "engine.py flags", "random_base.py flags"):
        assert f"ok    {check}" in out, check
    assert "ok    helper snippets compile" in out


def test_dry_run_fails_on_a_flag_the_cli_lacks(wheels: Path, tmp_path: Path) -> None:
    """A copy of the script passing `loom train` a misspelt flag, beside the real repo."""
    fake = tmp_path / "repo"
    (fake / "scripts").mkdir(parents=True)
    for part in ("src", "benchmarks", "examples", "pyproject.toml"):
        (fake / part).symlink_to(REPO / part)
    text = CHECK.read_text()
    assert '--adapter-name "$ADAPTER"' in text
    script = fake / "scripts" / "gpu_check.sh"
    script.write_text(text.replace('--adapter-name "$ADAPTER"', '--adapter-nam "$ADAPTER"'))
    done = _dry_run(script, wheels, tmp_path / "work")
    assert done.returncode != 0
    assert "FAIL  loom train flags" in done.stdout and "--adapter-nam" in done.stdout
    assert "1 check(s) failed" in done.stdout


def test_wheel_list_is_what_the_gpu_image_lacks() -> None:
    listed = _run(WHEELS, "--python", sys.executable, "--list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    names = {line.split("==")[0] for line in listed.stdout.split()}
    assert {"bitsandbytes", "trl", "fastapi", "uvicorn", "openai", "llguidance"} <= names
    assert not names & {"torch", "transformers", "numpy", "loom"}  # there already (or the checkout)
