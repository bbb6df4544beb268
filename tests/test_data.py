"""Row formats, validation errors with file:line:field, skipping, snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.data.formats import RowError, RowFormat, Templates
from loom.data.reader import read_rows
from loom.data.snapshot import snapshot
from loom.errors import LoomError
from loom.store import Store


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_formats_are_detected(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "system": "be brief",
            },
            {"prompt": "2+2?", "response": "4"},
            {"prompt": "3+3?", "completion": "6"},
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"text": "free text"},
        ],
    )
    ex = read_rows([str(f)]).examples
    assert ex[0].messages[0] == {"role": "system", "content": "be brief"}
    assert ex[1].messages[-1] == {"role": "assistant", "content": "4"}
    assert ex[2].messages[-1]["content"] == "6"
    assert ex[3].messages[0]["content"] == "Translate\n\nchat"
    assert ex[4].text == "free text" and not ex[4].messages


def test_fields_templates_build_prompt_and_response(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "snips.jsonl", [{"id": "a", "text": "play jazz", "label": "PlayMusic"}])
    t = Templates("Intent of: {text}", '{{"intent": "{label}"}}', "Label requests.")
    (ex,) = read_rows([str(f)], templates=t).examples
    assert ex.id == "a" and ex.label == "PlayMusic"
    assert ex.messages == [
        {"role": "system", "content": "Label requests."},
        {"role": "user", "content": "Intent of: play jazz"},
        {"role": "assistant", "content": '{"intent": "PlayMusic"}'},
    ]


@pytest.mark.parametrize(
    ("row", "line_field", "problem"),
    [
        ("{not json", (2, None), "invalid JSON"),
        ({"prompt": "q", "response": ""}, (2, "response"), "is empty"),
        ({"prompt": "q", "response": 5}, (2, "response"), "expected a string, got int"),
        ({"messages": [{"role": "user", "content": "q"}]}, (2, "messages"), "no assistant message"),
        ({"messages": [{"role": "bot", "content": "q"}]}, (2, "messages[0].role"), "is not one of"),
        ({"instruction": "x", "output": "  "}, (2, "output"), "is empty"),
        ({"foo": 1}, (2, None), "cannot tell the format"),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tmp_path: Path, row: object, line_field: tuple[int, str | None], problem: str
) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(RowError) as err:
        read_rows([str(f)])
    assert err.value.where == f"{f}:{line_field[0]}"
    assert err.value.field_name == line_field[1]
    assert problem in str(err.value) and "--skip-bad-rows" in str(err.value)


def test_skip_bad_rows_counts(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "{bad", {"prompt": "c", "response": ""}]
    )
    report = read_rows([str(f)], skip_bad_rows=True)
    assert (report.rows_read, report.rows_used, len(report.skipped)) == (3, 1, 2)
    assert f"{f}:2" in report.skipped[0]


def test_globs_and_missing_files(tmp_path: Path) -> None:
    for i in range(2):
        write_jsonl(tmp_path / f"part{i}.jsonl", [{"text": str(i)}])
    assert read_rows([str(tmp_path / "part*.jsonl")]).rows_used == 2
    with pytest.raises(LoomError, match="matches no file"):
        read_rows([str(tmp_path / "nope*.jsonl")])
    with pytest.raises(LoomError, match="--train-files"):
        read_rows(None)


def test_forced_format_reports_the_missing_field(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(RowError, match="'prompt': missing"):
        read_rows([str(f)], fmt=RowFormat.prompt_response)


def test_snapshot_breakdowns_and_reuse(store: Store) -> None:
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips_intent" / "dev.jsonl"
    if not data.is_file():
        pytest.skip("shared data not present")
    m, created = snapshot(store, [data], name="snips-dev")
    facts = m.dataset or {}
    assert created and facts["rows"] == 300 and facts["unique_ids"] == 300
    assert sum(facts["rows_per_label"].values()) == 300 and len(facts["rows_per_label"]) == 6
    assert facts["rows_per_source"] == {"dev.jsonl": 300}
    ids = store.backend.read_bytes(f"{store.resolve('snips-dev').rel}/row_ids.txt").decode().split()
    assert len(ids) == 300 and ids[0].startswith("snips-")
    assert snapshot(store, [data], name="snips-dev")[1] is False
