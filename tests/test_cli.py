"""The CLI end to end through Typer's runner (same code path as the console script)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loom.cli.main import app
from loom.store import Store

runner = CliRunner()


def loom(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


def test_import_ls_show_verify(store: Store, tiny_dir: Path) -> None:
    out = loom("store", "import-base", str(tiny_dir), "--name", "tiny", "--version", "v1", "--json")
    assert json.loads(out)["base"]["arch"]["model_type"] == "mistral"
    listing = json.loads(loom("store", "ls", "--json"))
    assert listing == [
        {"kind": "base", "name": "tiny", "agent": None, "versions": ["v1"], "aliases": {"current": "v1"}}
    ]
    shown = json.loads(loom("store", "show", "tiny", "--json"))
    assert shown["base"]["approx_vram_mb"] > 0
    assert "approx_vram_mb" in loom("store", "show", "tiny")
    assert json.loads(loom("store", "verify", "--json"))[0]["ok"] is True
    loom("store", "import-base", str(tiny_dir), "--name", "tiny", "--version", "v1", code=2)


def test_publish_adapter_alias_rollback_gc(store: Store, tiny_base: str, tiny_adapter_dir: Path) -> None:
    for v in ("v1", "v2", "v3"):
        loom(
            "store",
            "publish",
            str(tiny_adapter_dir),
            "--kind",
            "adapter",
            "--name",
            "intent",
            "--agent",
            "router",
            "--version",
            v,
            "--alias",
            "current",
        )
    assert json.loads(loom("store", "show", "intent", "--json"))["version"] == "v3"
    assert "rolled back to v2" in loom("store", "rollback", "intent")
    loom("store", "alias", "set", "intent", "champion", "v1")
    aliases = {a["alias"]: a["version"] for a in json.loads(loom("store", "alias", "ls", "intent", "--json"))}
    assert aliases == {"current": "v2", "champion": "v1"}
    gc = json.loads(loom("store", "gc", "--keep", "1", "--json"))
    assert gc["versions"] == []  # v1 and v2 are aliased, v3 is the newest
    loom("store", "alias", "set", "intent", "champion", "v3")
    # v1 is in both aliases' rollback history, v2 is current: gc says so and keeps them
    dry = " ".join(loom("store", "gc", "--keep", "1", "--dry-run").split())
    assert "adapter intent@v1 kept: in alias champion's history; in alias current's history" in dry
    assert "adapter intent@v2 kept: alias current points at it" in dry
    assert "would remove 0 leftovers, 0 stale leases and 0 versions" in dry
    assert json.loads(loom("store", "gc", "--keep", "1", "--json"))["versions"] == []
    assert "rolled back to v1" in loom("store", "rollback", "intent")
    assert "rolled back to v1" in loom("store", "rollback", "intent", "--alias", "champion")
    # both aliases on v1 with nothing earlier: v2 is needed by no one any more
    assert json.loads(loom("store", "gc", "--keep", "1", "--json"))["versions"] == ["intent@v2"]


def _publish_intent(adapter_dir: Path, version: str, *alias: str) -> str:
    return loom(
        "store", "publish", str(adapter_dir), "--kind", "adapter", "--name", "intent", "--agent", "router",
        "--version", version, *alias,
    )  # fmt: skip


def test_first_published_version_is_current(store: Store, tiny_base: str, tiny_adapter_dir: Path) -> None:
    _publish_intent(tiny_adapter_dir, "v1")  # no --alias
    assert json.loads(loom("store", "show", "intent", "--json"))["version"] == "v1"
    _publish_intent(tiny_adapter_dir, "v2")  # a later version moves current only when asked
    assert json.loads(loom("store", "show", "intent", "--json"))["version"] == "v1"
    shown = loom("store", "show", "intent")
    assert "v1" in shown and "v2" in shown and "intent@current → v1" in shown
    _publish_intent(tiny_adapter_dir, "v3", "--alias", "current")
    assert json.loads(loom("store", "show", "intent", "--json"))["version"] == "v3"


def test_show_lists_versions_of_a_name_without_current(
    store: Store, tiny_base: str, tiny_adapter_dir: Path
) -> None:
    _publish_intent(tiny_adapter_dir, "v1", "--alias", "champion")
    _publish_intent(tiny_adapter_dir, "v2")
    shown = " ".join(loom("store", "show", "intent").split())
    assert "v1" in shown and "champion" in shown and "v2" in shown
    assert "intent has no 'current' alias" in shown
    summary = json.loads(loom("store", "show", "intent", "--json"))
    assert summary["versions"] == ["v1", "v2"] and summary["aliases"] == {"champion": "v1"}


def test_verify_exit_code_names_the_corrupted_file(store: Store, tiny_base: str) -> None:
    from test_store import flip_byte

    path = store.backend.local_path(store.resolve(tiny_base).rel) / "tokenizer.json"
    flip_byte(path)
    out = loom("store", "verify", "--json", code=1)
    assert "tokenizer.json is corrupted" in json.loads(out)[0]["problems"][0]
    assert json.loads(loom("store", "verify", "--dry-run", "--json"))[0]["ok"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("store", "show", "nope"), "no artifact named 'nope'"),
        (("store", "show", "../x"), "not a store ref"),
        (("store", "import-base"), "nothing to import"),
        (("store", "import-base", "hf:org/model"), "HF_HUB_OFFLINE"),
        (("store", "import-base", "missing-dir"), "not a hub id"),
        (("store", "gc", "--keep", "0"), "--keep must be at least 1"),
    ],
)
def test_errors_are_one_clear_line(store: Store, args: tuple[str, ...], message: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "from loom.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr


def test_hub_import_fails_fast_without_network(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from loom.errors import OfflineError
    from loom.store.importers import import_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(OfflineError, match="cannot download org/model"):
        import_hub(store, "org/model")
    assert time.monotonic() - started < 30


def test_doctor_json(store: Store) -> None:
    checks = {c["name"]: c for c in json.loads(loom("doctor", "--json"))}
    assert checks["torch"]["status"] == "ok" and checks["store"]["status"] == "ok"
    assert checks["cuda"]["status"] in {"ok", "warn"}


def test_doctor_fails_on_unwritable_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = loom("doctor", "--json", "--store", str(blocker / "store"), code=1)
    assert any(c["status"] == "fail" for c in json.loads(out))
