"""Eval files beside versions, promotion gates, the promotion log and version status.

A real store in tmp_path (and one on moto's S3 server); artifacts are published with
``store.publish`` directly, so no model weights are needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loom.agents.spec import Gates
from loom.cli import output
from loom.cli.main import app
from loom.errors import IntegrityError, LoomError, NotFoundError
from loom.evals.gates import check_gates, passed
from loom.evals.promotion import (
    PromotionRefused,
    promote,
    read_log,
    rollback,
    status_of,
    versions_table,
)
from loom.evals.results import latest_eval, list_evals, new_eval_id, write_eval
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.gc import collect
from loom.store.manifest import Source
from loom.store.sealed import render, unseal
from loom.store.verify import verify_store

try:  # moto's S3 server (one per module) and a bucket per test, as the store's S3 tests use
    from test_s3_backend import s3_endpoint, s3_store  # noqa: F401

    HAVE_S3 = True
except pytest.skip.Exception:
    HAVE_S3 = False

ADAPTER = "intent-lora"
SUMMARY = {
    "base": {"ref": "tiny-mistral@v1"},
    "hyperparameters": {"adapter_r": 8, "adapter_alpha": 16, "learning_rate": 0.0002, "epochs": 2.0},
    "data": {"snapshot": "intent-lora-data@v20260101-0000", "rows_used": 480},
    "steps": 120,
}


def _adapter(store: Store, version: str, folder: Path) -> None:
    """A real (tiny) LoRA adapter version with the lineage a training run records."""
    publish_adapter(
        store,
        folder,
        agent="intent",
        name=ADAPTER,
        base="tiny-mistral@v1",
        training_summary=SUMMARY,
        version=version,
    )


def _golden(store: Store, name: str, rows: str) -> str:
    """A golden-set dataset version; returns its content sha256."""
    sha = hashlib.sha256(rows.encode()).hexdigest()

    def fill(d: Path) -> None:
        (d / "golden.jsonl").write_text(rows)

    store.publish(
        "dataset",
        name,
        fill=fill,
        describe=lambda _d: {"dataset": {"content_sha256": sha, "golden": {"rows": 1}}},
        source=Source(type="local", uri="t"),
        tags=["golden"],
        version="v1",
    )
    return sha


def _body(
    subject: str,
    golden_sha: str = "g" * 64,
    golden_ref: str = "intent-golden@v1",
    comparison: dict[str, Any] | None = None,
    eval_id: str | None = None,
    rows: int = 300,
    **metrics: Any,
) -> dict[str, Any]:
    """An eval body as loom eval writes it; a candidate other than v1 was compared with v1
    (current in these tests) unless ``comparison`` says otherwise ({} for none)."""
    m = {
        "n": 300,
        "accuracy": 0.97,
        "schema_validity": 1.0,
        "citation_presence": None,
        "citation_correct": None,
        "refusal_accuracy": 0.95,
        "latency_p50_s": 0.4,
        "latency_p95_s": 0.9,
        "per_category": {"play": {"n": 100, "accuracy": 0.98}},
    }
    m.update(metrics)
    body: dict[str, Any] = {
        "eval_id": eval_id or new_eval_id(),
        "agent": "intent",
        "subject": subject,
        "golden": {"ref": golden_ref, "sha256": golden_sha, "rows": rows, "of": 300},
        "created_at": "2026-12-01T03:04:05+00:00",
        "variants": {"candidate": {"ref": subject, "metrics": m}},
    }
    if comparison is None and subject != f"{ADAPTER}@v1":
        comparison = {"against": f"{ADAPTER}@v1", "metrics": {}}
    if comparison:
        body["comparison"] = comparison
    return body


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables and messages on one line each, so CLI output can be matched."""
    monkeypatch.setattr(output.console, "_width", 400)
    monkeypatch.setattr(output.err_console, "_width", 400)


@pytest.fixture
def lora(tiny_adapter_dir: Path) -> Path:
    return tiny_adapter_dir


@pytest.fixture
def two_versions(store: Store, tiny_base: str, lora: Path) -> Store:
    """intent-lora v1 (current, the first version) and v2 (a candidate) on the tiny base;
    golden set intent-golden@v1."""
    _adapter(store, "v1", lora)
    _adapter(store, "v2", lora)
    _golden(store, "intent-golden", '{"input": {"text": "play jazz"}, "expected": ["PlayMusic"]}\n')
    return store


def _sha(store: Store, ref: str) -> str:
    return str((store.resolve(ref).manifest.dataset or {})["content_sha256"])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- eval files
def test_eval_round_trip_newest_last(two_versions: Store) -> None:
    store = two_versions
    first = write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", eval_id="20261201-000000-aaaaaaaa"))
    later = _body(f"{ADAPTER}@v2", eval_id="20261201-000001-bbbbbbbb", accuracy=0.5)
    later["created_at"] = "2026-12-02T00:00:00+00:00"
    second = write_eval(store, f"{ADAPTER}@v2", later)
    assert first.rel == f"adapters/intent/{ADAPTER}/versions/v2/evals/20261201-000000-aaaaaaaa.json"
    records = list_evals(store, f"{ADAPTER}@v2")
    assert [r.eval_id for r in records] == [first.eval_id, second.eval_id]
    assert records[1].body == later and records[1].sha256 == second.sha256
    assert latest_eval(store, f"{ADAPTER}@v2") == records[1]
    assert list_evals(store, f"{ADAPTER}@v1") == []
    assert latest_eval(store, f"{ADAPTER}@v2", golden_sha256="other") is None


def test_write_eval_refuses_missing_version_other_subject_and_rewrites(two_versions: Store) -> None:
    store = two_versions
    with pytest.raises(NotFoundError, match="v9"):
        write_eval(store, f"{ADAPTER}@v9", _body(f"{ADAPTER}@v9"))
    with pytest.raises(LoomError, match=f"measured {ADAPTER}@v1, not {ADAPTER}@v2"):
        write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v1"))
    body = _body(f"{ADAPTER}@v2")
    write_eval(store, f"{ADAPTER}@v2", body)
    with pytest.raises(LoomError, match="already stored"):
        write_eval(store, f"{ADAPTER}@v2", body)
    with pytest.raises(LoomError, match="NaN"):
        write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", accuracy=float("nan")))


def test_writing_evals_leaves_manifest_and_files_byte_identical(two_versions: Store, tmp_path: Path) -> None:
    store = two_versions
    folder = tmp_path / "store" / f"adapters/intent/{ADAPTER}/versions/v2"
    before = _tree(folder)
    for _ in range(3):
        write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2"))
    after = _tree(folder)
    assert {k: v for k, v in after.items() if not k.startswith("evals/")} == before
    assert len(after) == len(before) + 3
    assert all(r.ok for r in verify_store(store)), [r.problems for r in verify_store(store)]


def test_every_flipped_byte_of_an_eval_file_is_caught() -> None:
    data = render(_body("x@v1", comparison={"against": "x@v0", "metrics": {}}))
    assert unseal(data, "f", "fix")[0]["subject"] == "x@v1"
    for i in range(len(data)):
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        with pytest.raises(IntegrityError, match="is damaged"):
            unseal(flipped, "f", "fix")
    # the same body and seal laid out another way (an edit that kept the JSON equal) is caught too
    relaid = json.dumps(json.loads(data), indent=4).encode()
    with pytest.raises(IntegrityError, match="bytes differ from how it was written"):
        unseal(relaid, "f", "fix")


def test_flipped_byte_reported_by_verify_and_list_evals(two_versions: Store, tmp_path: Path) -> None:
    store = two_versions
    record = write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2"))
    path = tmp_path / "store" / record.rel
    data = bytearray(path.read_bytes())
    at = data.index(b'"accuracy": 0.97') + len(b'"accuracy": 0.9')
    data[at] = ord("9")  # 0.97 -> 0.99: still valid JSON, only the seal catches it
    path.write_bytes(bytes(data))
    bad = [r for r in verify_store(store) if not r.ok]
    assert [r.ref for r in bad] == [f"{ADAPTER}@v2"]
    assert f"evals/{record.eval_id}.json is damaged" in bad[0].problems[0]
    assert "delete it and run 'loom eval' again" in bad[0].problems[0]
    assert not [r for r in verify_store(store, dry_run=True) if r.ok and r.ref == f"{ADAPTER}@v2"]
    with pytest.raises(IntegrityError, match=f"{record.eval_id}.json is damaged.*delete"):
        list_evals(store, f"{ADAPTER}@v2")
    result = CliRunner().invoke(app, ["store", "verify", f"{ADAPTER}@v2"])
    assert result.exit_code == 1 and "damaged" in result.output


def test_an_eval_write_cut_off_before_its_rename_does_not_fail_verify(
    two_versions: Store, tmp_path: Path
) -> None:
    store = two_versions
    folder = tmp_path / "store" / store.resolve(f"{ADAPTER}@v2").rel / "evals"
    folder.mkdir()
    (folder / ".20261201-000000-deadbeef.json.1a2b.tmp").write_text('{"half": ')
    assert all(r.ok for r in verify_store(store)), [r.problems for r in verify_store(store)]
    (folder / "stray.txt").write_text("x")  # anything else there is still reported
    assert not all(r.ok for r in verify_store(store))


def test_verify_still_reports_other_unexpected_files(two_versions: Store, tmp_path: Path) -> None:
    store = two_versions
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2"))
    (tmp_path / "store" / f"adapters/intent/{ADAPTER}/versions/v2/evals/notes.txt").write_text("x")
    (report,) = [r for r in verify_store(store, f"{ADAPTER}@v2")]
    assert report.problems == [f"{ADAPTER}@v2: unexpected file evals/notes.txt (not in the manifest)"]


def test_gc_removes_a_version_with_its_evals(two_versions: Store, tmp_path: Path, lora: Path) -> None:
    store = two_versions
    _adapter(store, "v3", lora)
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2"))
    report = collect(store, keep=1)  # v1 is current, v3 the newest: v2 goes
    assert report.versions == [f"{ADAPTER}@v2"]
    assert not (tmp_path / "store" / f"adapters/intent/{ADAPTER}/versions/v2").exists()
    assert all(r.ok for r in verify_store(store))


@pytest.mark.skipif(not HAVE_S3, reason="needs s3fs and moto")
def test_evals_on_an_object_store(
    s3_store: Store, tiny_dir: Path, lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loom.store.cache import materialize
    from loom.store.importers import import_hf_dir

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    import_hf_dir(s3_store, tiny_dir, "tiny-mistral", version="v1")
    for version in ("v1", "v2", "v3"):
        _adapter(s3_store, version, lora)
    record = write_eval(s3_store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2"))
    assert [r.eval_id for r in list_evals(s3_store, f"{ADAPTER}@v2")] == [record.eval_id]
    assert all(r.ok for r in verify_store(s3_store))
    folder = materialize(s3_store, s3_store.resolve(f"{ADAPTER}@v2"))  # the cache skips evals/
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        lora / "adapter_model.safetensors"
    ).read_bytes()
    assert not (folder / "evals").exists()
    fs, full = s3_store.backend.fs, s3_store.backend.full  # type: ignore[attr-defined]
    fs.pipe_file(full(record.rel), s3_store.backend.read_bytes(record.rel).replace(b"0.97", b"0.99"))
    assert [r.ref for r in verify_store(s3_store) if not r.ok] == [f"{ADAPTER}@v2"]
    with pytest.raises(IntegrityError, match="is damaged"):
        list_evals(s3_store, f"{ADAPTER}@v2")
    assert collect(s3_store, keep=1).versions == [f"{ADAPTER}@v2"]  # v1 is current, v3 the newest
    assert not fs.exists(full(record.rel))


# ---------------------------------------------------------------- gates
def _cmp(**metrics: dict[str, Any]) -> dict[str, Any]:
    return {"against": f"{ADAPTER}@v1", "metrics": metrics}


@pytest.mark.parametrize(
    ("gate", "metric", "value", "threshold", "ok"),
    [
        ("accuracy", "accuracy", 0.95, 0.95, True),
        ("accuracy", "accuracy", 0.9499, 0.95, False),
        ("schema_validity", "schema_validity", 1.0, 1.0, True),
        ("schema_validity", "schema_validity", 0.98, 0.99, False),
        ("citation_presence", "citation_presence", 0.9, 0.9, True),
        ("citation_presence", "citation_presence", 0.89, 0.9, False),
        ("refusal_accuracy", "refusal_accuracy", 0.91, 0.9, True),
        ("refusal_accuracy", "refusal_accuracy", 0.5, 0.9, False),
        ("p95_latency_s", "latency_p95_s", 1.49, 1.5, True),
        ("p95_latency_s", "latency_p95_s", 1.5, 1.5, False),  # strictly below
    ],
)
def test_threshold_gates(gate: str, metric: str, value: float, threshold: float, ok: bool) -> None:
    gates = Gates(**{gate: threshold})
    (result,) = [r for r in check_gates(_body("a@v2", **{metric: value}), gates) if r.name == gate]
    assert (result.passed, result.value, result.threshold, result.measured) == (ok, value, threshold, True)


@pytest.mark.parametrize("gate", ["accuracy", "schema_validity", "citation_presence", "refusal_accuracy"])
def test_an_unmeasured_metric_skips_its_gate(gate: str) -> None:
    results = check_gates(_body("a@v2", **{gate: None}), Gates(**{gate: 0.99}))
    (result,) = [r for r in results if r.name == gate]
    assert result.passed and not result.measured and "not measured" in result.detail


def test_switched_off_gates_are_not_checked_and_defaults_apply() -> None:
    off = Gates(
        accuracy=None, citation_presence=None, refusal_accuracy=None, p95_latency_s=None, no_regression=False
    )
    assert check_gates(_body("a@v2", accuracy=0.0), off) == []
    names = [r.name for r in check_gates(_body("a@v2"), Gates())]
    assert names == ["accuracy", "citation_presence", "refusal_accuracy", "p95_latency_s", "no_regression"]
    with pytest.raises(LoomError, match=r"no variants\.candidate\.metrics"):
        check_gates({"eval_id": "x"}, Gates())


def test_no_regression_recomputes_significance_from_p_value() -> None:
    def gate(comparison: dict[str, Any] | None, alpha: float = 0.05) -> Any:
        (r,) = [
            r
            for r in check_gates(_body("a@v2", comparison=comparison or {}), Gates(alpha=alpha))
            if r.name == "no_regression"
        ]
        return r

    skipped = gate(None)
    assert skipped.passed and not skipped.measured and "no promoted version" in skipped.detail
    # the stored flags say "fine", the p-value says worse at 0.05
    lying = {"diff": -0.03, "p_value": 0.01, "significant": False, "worse": False}
    assert not gate(_cmp(accuracy=lying)).passed
    assert "accuracy (p=0.01 < alpha 0.05)" in gate(_cmp(accuracy=lying)).detail
    # the stored flags say "regression", the p-value says noise at this alpha
    noisy = {"diff": -0.03, "p_value": 0.03, "significant": True, "worse": True}
    assert gate(_cmp(accuracy=noisy), alpha=0.01).passed
    assert not gate(_cmp(accuracy=noisy), alpha=0.05).passed
    assert "within noise" in gate(_cmp(accuracy=noisy), alpha=0.01).detail
    # better is never a regression, however significant; slower latency is
    better = {"diff": 0.05, "p_value": 0.0001, "worse": False}
    assert gate(_cmp(accuracy=better)).passed
    slower = {"diff": 0.2, "p_value": 0.001, "worse": False}
    assert not gate(_cmp(latency_p95_s=slower)).passed
    # without a p-value, the interval decides
    assert not gate(_cmp(citation_presence={"diff": -0.1, "ci": [-0.2, -0.05], "worse": True})).passed
    assert gate(_cmp(citation_presence={"diff": -0.1, "ci": [-0.2, 0.05], "worse": True})).passed
    assert passed(check_gates(_body("a@v2", comparison=_cmp(accuracy=better)), Gates()))


# ---------------------------------------------------------------- promotion
def test_promote_passes_moves_current_and_logs(two_versions: Store) -> None:
    store = two_versions
    sha = _sha(store, "intent-golden@v1")
    record = write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", golden_sha=sha))
    decision = promote(store, f"{ADAPTER}@v2", golden="intent-golden", gates=Gates())
    assert decision.promoted and store.resolve(ADAPTER).version == "v2"
    (event,) = read_log(store, store.find(ADAPTER))
    assert event.action == "promote" and (event.from_version, event.to_version) == ("v1", "v2")
    assert event.eval_id == record.eval_id and event.golden == {"ref": "intent-golden@v1", "sha256": sha}
    assert (
        event.metrics is not None
        and event.metrics["accuracy"] == 0.97
        and "per_category" not in event.metrics
    )
    assert [g["name"] for g in event.gates] == [r.name for r in decision.gates]
    assert "@" in event.who and event.when is not None and event.reason is None


def test_promote_refused_keeps_current_logs_and_lists_gates(two_versions: Store) -> None:
    store = two_versions
    sha = _sha(store, "intent-golden@v1")
    write_eval(
        store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", golden_sha=sha, accuracy=0.80, latency_p95_s=3.0)
    )
    with pytest.raises(PromotionRefused) as info:
        promote(store, f"{ADAPTER}@v2", golden="intent-golden@v1", gates=Gates())
    message = str(info.value)
    assert "accuracy: accuracy 0.8 not >= 0.95" in message and "p95_latency_s" in message
    assert "refusal_accuracy" not in message  # it passed
    assert "--force --reason TEXT" in message and "current is unchanged" in message
    assert store.resolve(ADAPTER).version == "v1"
    (event,) = read_log(store, store.find(ADAPTER))
    assert event.action == "refused" and event.to_version == "v2" and event.from_version == "v1"
    assert [g["passed"] for g in event.gates if g["name"] == "accuracy"] == [False]


def test_force_needs_a_reason_and_is_logged_as_such(two_versions: Store) -> None:
    store = two_versions
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", accuracy=0.5))
    for reason in (None, "  "):
        with pytest.raises(LoomError, match="--force needs --reason TEXT"):
            promote(store, f"{ADAPTER}@v2", golden=None, gates=Gates(), force=True, reason=reason)
    assert read_log(store, store.find(ADAPTER)) == [] and store.resolve(ADAPTER).version == "v1"
    decision = promote(
        store, f"{ADAPTER}@v2", golden=None, gates=Gates(), force=True, reason="hotfix for ticket 7"
    )
    assert decision.promoted and store.resolve(ADAPTER).version == "v2"
    (event,) = read_log(store, store.find(ADAPTER))
    assert event.action == "force-promote" and event.reason == "hotfix for ticket 7"
    assert not all(g["passed"] for g in event.gates)


def test_no_eval_and_other_golden_sets_are_clear_errors(two_versions: Store) -> None:
    store = two_versions
    with pytest.raises(LoomError, match=rf"{ADAPTER}@v2 has no eval results; run 'loom eval"):
        promote(store, f"{ADAPTER}@v2", golden=None, gates=Gates())
    other_sha = _golden(store, "other-golden", '{"input": {"text": "x"}}\n')
    # a passing eval of v2 against another golden set, and one of v1 against this one: neither counts
    write_eval(
        store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", golden_sha=other_sha, golden_ref="other-golden@v1")
    )
    write_eval(store, f"{ADAPTER}@v1", _body(f"{ADAPTER}@v1", golden_sha=_sha(store, "intent-golden@v1")))
    with pytest.raises(
        LoomError, match=r"no eval against golden set intent-golden@v1 .*other-golden@v1 only"
    ):
        promote(store, f"{ADAPTER}@v2", golden="intent-golden", gates=Gates())
    with pytest.raises(LoomError, match="NAME@VERSION"):
        promote(store, ADAPTER, golden=None, gates=Gates())
    assert store.resolve(ADAPTER).version == "v1" and read_log(store, store.find(ADAPTER)) == []
    assert promote(store, f"{ADAPTER}@v2", golden="other-golden", gates=Gates()).promoted


def test_a_smoke_eval_or_a_stale_comparison_cannot_promote(two_versions: Store, lora: Path) -> None:
    store = two_versions
    sha = _sha(store, "intent-golden@v1")
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", golden_sha=sha, rows=5))  # --limit 5
    with pytest.raises(LoomError, match=r"only --limit evals .*\(5 of 300 rows\)"):
        promote(store, f"{ADAPTER}@v2", golden="intent-golden", gates=Gates())
    # v2 and v3 both compared with v1; v3 goes live: v2's comparison says nothing about v3 now
    _adapter(store, "v3", lora)
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", golden_sha=sha))
    write_eval(store, f"{ADAPTER}@v3", _body(f"{ADAPTER}@v3", golden_sha=sha))
    assert promote(store, f"{ADAPTER}@v3", golden="intent-golden", gates=Gates()).promoted
    with pytest.raises(
        LoomError, match=rf"compared {ADAPTER}@v2 with {ADAPTER}@v1, but {ADAPTER}@v3 is live"
    ):
        promote(store, f"{ADAPTER}@v2", golden="intent-golden", gates=Gates())
    assert store.resolve(ADAPTER).version == "v3"
    assert promote(store, f"{ADAPTER}@v2", golden="intent-golden", gates=Gates(no_regression=False)).promoted


def test_a_promotion_cut_off_before_its_log_entry_is_logged_from_where_it_came(two_versions: Store) -> None:
    store = two_versions
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", golden_sha=_sha(store, "intent-golden@v1")))
    store.set_alias(ADAPTER, "current", "v2")  # an attempt moved the alias, then died
    decision = promote(store, f"{ADAPTER}@v2", golden="intent-golden", gates=Gates())
    assert (decision.event.from_version, decision.event.to_version) == ("v1", "v2")


def test_rollback_is_logged_from_the_library_and_both_clis(two_versions: Store) -> None:
    store = two_versions
    store.set_alias(ADAPTER, "current", "v2")
    event = rollback(store, ADAPTER)
    assert (event.action, event.from_version, event.to_version) == ("rollback", "v2", "v1")
    store.set_alias(ADAPTER, "current", "v2")
    result = CliRunner().invoke(app, ["store", "rollback", ADAPTER])
    assert result.exit_code == 0, result.output
    store.set_alias(ADAPTER, "current", "v2")
    result = CliRunner().invoke(app, ["rollback", ADAPTER, "--alias", "current"])
    assert result.exit_code == 0 and "rolled back to v1 (was v2)" in result.output
    log = read_log(store, store.find(ADAPTER))
    assert [(e.action, e.to_version) for e in log] == [("rollback", "v1")] * 3


def test_status_of_each_state(two_versions: Store, lora: Path) -> None:
    store = two_versions
    artifact = store.find(ADAPTER)
    _adapter(store, "v3", lora)
    _adapter(store, "v4", lora)
    assert [status_of(store, artifact, v) for v in ("v1", "v2", "v3", "v4")] == [
        "deployed",
        *["candidate"] * 3,
    ]
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2"))
    promote(store, f"{ADAPTER}@v2", golden=None, gates=Gates())
    write_eval(store, f"{ADAPTER}@v3", _body(f"{ADAPTER}@v3", accuracy=0.1))
    with pytest.raises(PromotionRefused):
        promote(store, f"{ADAPTER}@v3", golden=None, gates=Gates())
    statuses = [status_of(store, artifact, v) for v in ("v1", "v2", "v3", "v4")]
    assert statuses == ["archived", "deployed", "failed", "candidate"]
    rollback(store, ADAPTER)
    assert [status_of(store, artifact, v) for v in ("v1", "v2")] == ["deployed", "archived"]


def test_versions_table_and_cli(two_versions: Store, tmp_path: Path) -> None:
    store = two_versions
    record = write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", citation_presence=0.93))
    rows = versions_table(store, ADAPTER)
    assert [r["version"] for r in rows] == ["v1", "v2"]
    v2 = rows[1]
    info = store.resolve(f"{ADAPTER}@v2").manifest.adapter
    assert info is not None
    assert (v2["base"], v2["dataset"], v2["r"], v2["alpha"], v2["lr"], v2["epochs"], v2["steps"]) == (
        "tiny-mistral@v1",
        "intent-lora-data@v20260101-0000",
        info.r,
        info.alpha,
        0.0002,
        2.0,
        120,
    )
    assert v2["eval"]["eval_id"] == record.eval_id and v2["eval"]["metrics"]["citation_presence"] == 0.93
    assert (rows[0]["status"], rows[0]["aliases"], v2["status"], v2["eval"] is not None) == (
        "deployed",
        ["current"],
        "candidate",
        True,
    )
    result = CliRunner().invoke(app, ["versions", ADAPTER, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[1]["eval"]["eval_id"] == record.eval_id
    table = CliRunner().invoke(app, ["versions", ADAPTER])
    assert table.exit_code == 0 and "deployed" in table.output and "acc 0.97" in table.output
    path = tmp_path / "store" / record.rel
    path.write_bytes(path.read_bytes().replace(b"0.93", b"0.99"))
    damaged = versions_table(store, ADAPTER)[1]["eval"]
    assert "is damaged" in damaged["error"]


def test_cli_promote_takes_gates_from_the_agent_map(
    two_versions: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = two_versions
    monkeypatch.chdir(tmp_path)  # no ./AGENT_MODEL_MAP.json here
    monkeypatch.delenv("LOOM_AGENT_MAP", raising=False)
    write_eval(store, f"{ADAPTER}@v2", _body(f"{ADAPTER}@v2", accuracy=0.97))
    agent_map = tmp_path / "map.json"
    agent_map.write_text(
        json.dumps({"agents": {"intent": {"adapter": f"{ADAPTER}@current", "gates": {"accuracy": 0.99}}}})
    )
    refused = CliRunner().invoke(app, ["promote", f"{ADAPTER}@v2", "--agents", str(agent_map)])
    assert refused.exit_code == 2
    assert (
        f"gates of agent 'intent' in {agent_map}" in refused.output and "0.97 not >= 0.99" in refused.output
    )
    forced = CliRunner().invoke(app, ["promote", f"{ADAPTER}@v2", "--agents", str(agent_map), "--force"])
    assert forced.exit_code == 2 and "--reason" in forced.output
    ok = CliRunner().invoke(app, ["promote", f"{ADAPTER}@v2", "--json"])  # default gates: 0.97 >= 0.95
    assert ok.exit_code == 0, ok.output
    assert (
        json.loads(ok.stdout)["action"] == "promote"
        and "default gates" in json.loads(ok.stdout)["gates_source"]
    )
    assert store.resolve(ADAPTER).version == "v2"
    assert [e.action for e in read_log(store, store.find(ADAPTER))] == ["refused", "promote"]
