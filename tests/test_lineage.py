"""Lineage: semver versions from the previous version's lineage, and ``loom trace`` down to rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import import_retemplated_base
from typer.testing import CliRunner

from loom.cli.main import app
from loom.data.snapshot import snapshot
from loom.errors import LoomError, NotFoundError
from loom.evals.lineage import nearest_rows, trace, trace_target
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.train.versions import (
    bump_kind,
    next_version,
    parse_semver,
    plan_version,
    semver_label,
    snapshot_row_ids,
)

runner = CliRunner()


def loom(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


def _rows(n: int, prefix: str = "row", start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{i}", "prompt": f"play song number {i}", "response": "PlayMusic"}
        for i in range(start, start + n)
    ]


def _snapshot(
    store: Store, tmp: Path, rows: list[dict[str, Any]], name: str = "intent-data", file: str = "train"
) -> str:
    """Publish ``rows`` as a snapshot (a fresh folder each time: the file name is part of its hash)."""
    folder = tmp / f"{file}-{len(list(tmp.glob(f'{file}-*')))}"
    folder.mkdir()
    path = folder / f"{file}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, _created = snapshot(store, [path], name=name)
    return f"{m.name}@{m.version}"


def _summary(base: str, fingerprint: str, snapshot_ref: str | None) -> dict[str, Any]:
    return {
        "status": "completed",
        "steps": 40,
        "final_train_loss": 0.42,
        "base": {"ref": base, "fingerprint": fingerprint},
        "prompting": {"uses_chat_template": True, "system_prompt": "Classify the intent.", "format": "auto"},
        "hyperparameters": {
            "learning_rate": 0.0002,
            "epochs": 1.0,
            "adapter_r": 4,
            "seed": 7,
            "device": "cpu",
        },
        "data": {"snapshot": snapshot_ref, "rows_used": 10},
    }


def _publish(store: Store, adapter: Path, base: str, version: str, snapshot_ref: str | None) -> str:
    fingerprint = store.resolve(base).manifest.base.fingerprint  # type: ignore[union-attr]
    m = publish_adapter(
        store,
        adapter,
        agent="intent",
        name="intent",
        base=base,
        version=version,
        training_summary=_summary(base, fingerprint, snapshot_ref),
    )
    return f"{m.name}@{m.version}"


def _fingerprint(store: Store, base: str) -> str:
    info = store.resolve(base).manifest.base
    assert info is not None
    return info.fingerprint


# ------------------------------------------------------------------ versions
def test_semver_names_and_labels() -> None:
    assert parse_semver("v1.2.0") == (1, 2, 0) and parse_semver("v10.0.12") == (10, 0, 12)
    assert parse_semver("v20240101-1200") is None and parse_semver("v1") is None
    assert parse_semver("1.2.0") is None and parse_semver("v1.2.0-rc1") is None
    assert semver_label("intent", "v1.2.0") == "intent-v1.2.0"


def test_first_version_is_v1_0_0(store: Store, tiny_base: str, tiny_adapter_dir: Path) -> None:
    fp = _fingerprint(store, tiny_base)
    for bump in ("major", "minor", "patch", "auto"):
        assert next_version(store, "intent", bump, fp, None) == "v1.0.0"
    _publish(store, tiny_adapter_dir, tiny_base, "v20240101-1200", None)  # not semver: no lineage to bump
    plan = plan_version(store, "intent", "minor", fp, None)
    assert (plan.version, plan.kind, plan.previous) == ("v1.0.0", None, None)
    with pytest.raises(LoomError, match="--bump sideways: unknown; use one of major, minor, patch, auto"):
        next_version(store, "intent", "sideways", fp, None)
    with pytest.raises(LoomError, match="already has a base of that name"):
        next_version(store, "tiny-mistral", "patch", fp, None)


def test_explicit_bumps_follow_the_highest_semver_version(
    store: Store, tiny_base: str, tiny_adapter_dir: Path
) -> None:
    fp = _fingerprint(store, tiny_base)
    _publish(store, tiny_adapter_dir, tiny_base, "v1.10.2", None)
    _publish(store, tiny_adapter_dir, tiny_base, "v1.9.3", None)  # newer, but lower: not the previous
    assert next_version(store, "intent", "major", fp, None) == "v2.0.0"
    assert next_version(store, "intent", "minor", fp, None) == "v1.11.0"
    assert next_version(store, "intent", "patch", fp, None) == "v1.10.3"
    assert plan_version(store, "intent", "patch", fp, None).previous == "intent@v1.10.2"


def test_auto_bump_decides_from_base_and_new_rows(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    fp = _fingerprint(store, tiny_base)
    first = _snapshot(store, tmp_path, _rows(20))
    _publish(store, tiny_adapter_dir, tiny_base, "v1.2.0", first)
    prev = store.resolve("intent@v1.2.0").manifest

    other = import_retemplated_base(store, tiny_base, tmp_path, "other-base")  # same shapes, new fingerprint
    kind, reason = bump_kind(store, prev, _fingerprint(store, other), first)
    assert kind == "major" and "base fingerprint changed" in reason
    assert next_version(store, "intent", "auto", _fingerprint(store, other), first) == "v2.0.0"

    assert bump_kind(store, prev, fp, first)[0] == "patch"  # same data, same base
    assert next_version(store, "intent", "auto", fp, first) == "v1.2.1"

    three_new = _snapshot(store, tmp_path, _rows(17) + _rows(3, prefix="new"))  # 3 of 20 new: 15%
    kind, reason = bump_kind(store, prev, fp, three_new)
    assert kind == "minor" and reason.startswith("15.0% of ") and "over 10%" in reason
    assert next_version(store, "intent", "auto", fp, three_new) == "v1.3.0"

    two_new = _snapshot(store, tmp_path, _rows(18) + _rows(2, prefix="new"))  # exactly 10%: not more than 10%
    kind, reason = bump_kind(store, prev, fp, two_new)
    assert kind == "patch" and reason.startswith("10.0% of ")
    assert next_version(store, "intent", "auto", fp, two_new) == "v1.2.1"

    more_rows = _snapshot(store, tmp_path, _rows(20) + _rows(3, prefix="new"))  # 3 of 23 = 13%: the new share
    assert bump_kind(store, prev, fp, more_rows)[0] == "minor"
    assert snapshot_row_ids(store, more_rows)[-1] == "new-2"


def test_auto_bump_without_a_previous_snapshot_counts_every_row_as_new(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    fp = _fingerprint(store, tiny_base)
    _publish(store, tiny_adapter_dir, tiny_base, "v1.0.0", None)
    prev = store.resolve("intent@v1.0.0").manifest
    snap = _snapshot(store, tmp_path, _rows(5))
    assert bump_kind(store, prev, fp, snap)[0] == "minor"
    kind, reason = bump_kind(store, prev, fp, None)
    assert kind == "patch" and "no dataset snapshot to compare" in reason


# ------------------------------------------------------------------ trace
PLANTED = {
    "id": "zebra-7",
    "prompt": "where is the zebra crossing near platform nine",
    "response": "GetDirections",
}


def test_trace_from_name_at_version_down_to_snapshot_rows(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    snap = _snapshot(store, tmp_path, [*_rows(12)[:6], PLANTED, *_rows(12)[6:]])
    ref = _publish(store, tiny_adapter_dir, tiny_base, "v1.2.0", snap)
    t = trace(store, ref)
    assert (t.ref, t.kind, t.agent, t.label) == ("intent@v1.2.0", "adapter", "intent", "intent-v1.2.0")
    assert t.base == {"ref": tiny_base, "fingerprint": _fingerprint(store, tiny_base)}
    hp = t.training["hyperparameters"]
    assert hp == {"learning_rate": 0.0002, "epochs": 1.0, "adapter_r": 4, "seed": 7}  # key ones only
    assert t.training["prompt"]["system_prompt"] == "Classify the intent."
    assert t.training["steps"] == 40 and t.problems == []
    assert t.snapshot is not None and t.snapshot.ref == snap and t.snapshot.rows == 13
    assert [f["path"] for f in t.snapshot.files] == ["train.jsonl"]
    assert json.loads(json.dumps(t.to_json()))["snapshot"]["rows"] == 13  # JSON-ready

    assert trace(store, "intent-v1.2.0").ref == "intent@v1.2.0"  # the deployment label works too
    assert trace(store, "intent").ref == "intent@v1.2.0"  # current
    base = trace(store, tiny_base)
    assert base.kind == "base" and base.snapshot is None and base.training == {}

    out = json.loads(loom("trace", ref, "--query", "zebra platform", "--top", "3", "--json"))
    assert out["rows"][0]["row_id"] == "zebra-7" and out["rows"][0]["row"] == PLANTED
    assert out["snapshot"]["ref"] == snap
    text = loom("trace", "intent-v1.2.0", "--query", "zebra crossing")
    assert (
        "zebra-7" in text and "intent@v1.2.0" in text and "13 rows" in text and "learning_rate=0.0002" in text
    )


def test_bm25_finds_the_planted_row_and_ids_follow_the_snapshot(
    store: Store, tiny_base: str, tmp_path: Path
) -> None:
    noise = [
        {"prompt": f"what is the weather in city {i} today", "response": "GetWeather"} for i in range(30)
    ]
    snap = _snapshot(store, tmp_path, [*noise[:20], PLANTED, *noise[20:]], name="weather-data", file="mixed")
    found = nearest_rows(store, snap, "Zebra crossing?", k=3)
    assert found[0][0] == "zebra-7" and found[0][2] == PLANTED
    assert all(score > 0 for _id, score, _row in found)
    assert len(found) == 1  # no other row shares a word with the query
    weather = nearest_rows(store, snap, "weather city 4", k=2)
    assert weather[0][0] == "mixed.jsonl:5"  # rows without an id: file:line, as the snapshot recorded them
    assert set(snapshot_row_ids(store, snap)) >= {i for i, _s, _r in weather}
    assert nearest_rows(store, snap, "kangaroo", k=3) == []
    with pytest.raises(LoomError, match="has no words"):
        nearest_rows(store, snap, "?!", k=3)


def test_unknown_refs_are_clear_errors(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError, match="no artifact named 'nope'"):
        trace(store, "nope@v1.0.0")
    _publish(store, tiny_adapter_dir, tiny_base, "v1.0.0", None)
    with pytest.raises(
        NotFoundError, match=r"intent@v9.0.0: no such version or alias; available versions: v1.0.0"
    ):
        trace(store, "intent@v9.0.0")
    with pytest.raises(NotFoundError, match="pass --log PATH"):
        trace_target(store, "resp-123")
    err = loom("trace", "resp-123", code=2)
    assert "no model version of that name" in err and "--log PATH" in err
    t = trace(store, "intent@v1.0.0")
    assert t.snapshot is None and "records no dataset snapshot" in t.problems[0]
    with pytest.raises(LoomError, match=r"--query needs a dataset snapshot, but intent@v1\.0\.0 has none"):
        trace_target(store, "intent@v1.0.0", query="zebra")
    snap = _snapshot(store, tmp_path, _rows(3))
    with pytest.raises(LoomError, match="is a dataset snapshot, not a model version"):
        trace(store, snap)
    with pytest.raises(LoomError, match="is a adapter, not a dataset snapshot"):
        nearest_rows(store, "intent@v1.0.0", "song", 3)


def test_response_ids_trace_through_the_request_log(
    store: Store, tiny_base: str, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    """A response id found in the server's real request log (SQLite) traces to its training rows."""
    from loom.serve.requestlog import LoggedResponse, RequestLog

    snap = _snapshot(store, tmp_path, [*_rows(5), PLANTED])
    ref = _publish(store, tiny_adapter_dir, tiny_base, "v1.0.0", snap)
    log = tmp_path / "requests.sqlite"
    mv = {"base": tiny_base, "adapter": ref}
    writer = RequestLog(log, retention=100, keep_prompts=True)
    for rid, version in (("resp-1", mv), ("resp-2", {"base": None, "adapter": None})):
        writer.record(LoggedResponse(rid, 0.0, "/v1/agents/{name}/run", "intent", version, None, "x", 0.1))
    writer.close()
    t = trace_target(store, "resp-1", log, query="zebra", k=2)
    assert (t.response_id, t.model_version, t.ref) == ("resp-1", mv, ref)
    assert t.rows[0]["row_id"] == "zebra-7"
    out = json.loads(loom("trace", "resp-1", "--log", str(log), "--json"))
    assert out["snapshot"]["ref"] == snap and out["response_id"] == "resp-1"
    with pytest.raises(NotFoundError, match="response id 'resp-9' is not in the request log"):
        trace_target(store, "resp-9", log)
    with pytest.raises(LoomError, match="answered by a fallback"):
        trace_target(store, "resp-2", log)
    with pytest.raises(NotFoundError, match="no request log there"):
        trace_target(store, "resp-1", tmp_path / "missing.sqlite")


# ------------------------------------------------------------------ loom train --bump
def _train(store: Store, data: Path, out: Path, *extra: str, code: int = 0) -> str:
    return loom(
        "train", "--train-files", str(data), "--output_dir", str(out), "--max-steps", "1",
        "--train-batch-size", "4", "--adapter-r", "2", "--agent", "intent", "--adapter-name", "intent",
        *extra, code=code,
    )  # fmt: skip


def test_train_bump_names_versions_from_lineage(store: Store, tiny_base: str, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(20)))
    err = _train(store, data, tmp_path / "r0", "--bump", "auto", code=2)
    assert "--bump auto names the published version; add --publish" in err
    err = _train(
        store, data, tmp_path / "r0", "--publish", "--bump", "patch", "--adapter-version", "v3", code=2
    )
    assert "--bump and --adapter-version both name the version" in err

    _train(store, data, tmp_path / "r1", "--publish", "--bump", "auto")
    first = json.loads((tmp_path / "r1" / "training_summary.json").read_text())
    assert first["version_bump"]["version"] == "v1.0.0" and store.resolve("intent").version == "v1.0.0"
    _train(store, data, tmp_path / "r2", "--publish", "--bump", "auto")
    again = json.loads((tmp_path / "r2" / "training_summary.json").read_text())
    assert again["version_bump"]["kind"] == "patch" and again["version_bump"]["previous"] == "intent@v1.0.0"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(20) + _rows(4, prefix="new")))
    text = _train(store, data, tmp_path / "r3", "--publish", "--bump", "auto")
    assert "intent@v1.1.0" in text and "minor" in text
    published = store.resolve("intent@v1.1.0").manifest.training_summary or {}
    assert published["version_bump"]["kind"] == "minor"  # the published summary says why
    on_disk = json.loads((tmp_path / "r3" / "training_summary.json").read_text())
    assert on_disk["version_bump"] == published["version_bump"]
    assert trace(store, "intent-v1.1.0").training["version_bump"]["previous"] == "intent@v1.0.1"
