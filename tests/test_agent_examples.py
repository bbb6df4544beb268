"""The example agents' data and configs (loom.agents.examples): prepare() on small slices
of the shared data. No training here."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from loom.agents.examples import EXAMPLES, default_data_dir, prepare, read_jsonl
from loom.data.formats import RowFormat, Templates, to_example
from loom.errors import LoomError
from loom.train.config import load_config

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "squad_qa").is_dir(), reason=f"no shared data at {DATA}")
SLICE = 60


@pytest.fixture(scope="module")
def data_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first rows of each shared task file, in the shared layout."""
    root = tmp_path_factory.mktemp("data")
    for task in ("snips_intent", "squad_qa"):
        for split in ("train", "dev"):
            lines = (DATA / task / f"{split}.jsonl").read_text().splitlines()[:SLICE]
            (root / task).mkdir(exist_ok=True)
            (root / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(data_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("out")
    return {name: prepare(name, data_slice, out) for name in EXAMPLES}


def _rows(name: str, prepared: dict[str, Path], split: str) -> list[dict]:
    config = load_config(prepared[name], {})
    path = Path(config.train_files[0]).with_name(f"{split}.jsonl")
    return read_jsonl(path)


def test_prepared_configs_load_and_point_at_real_files(prepared: dict[str, Path], data_slice: Path) -> None:
    for name, path in prepared.items():
        config = load_config(path, {})
        assert config.agent == name and config.publish and config.alias == "current"
        assert config.format is RowFormat.fields and config.system_prompt
        assert all(Path(f).is_file() for f in config.train_files), config.train_files
    # intent trains on the shared rows as they are: no derived copy
    assert load_config(prepared["intent"], {}).train_files == [
        str(data_slice / "snips_intent" / "train.jsonl")
    ]


def test_prepare_is_deterministic(data_slice: Path, prepared: dict[str, Path], tmp_path: Path) -> None:
    for name in ("qa_cited", "re_ranker"):
        again = prepare(name, data_slice, tmp_path)
        for split in ("train", "dev"):
            first = Path(load_config(prepared[name], {}).train_files[0]).with_name(f"{split}.jsonl")
            second = Path(load_config(again, {}).train_files[0]).with_name(f"{split}.jsonl")
            assert first.read_bytes() == second.read_bytes()


def test_rows_have_the_fields_the_templates_use(prepared: dict[str, Path]) -> None:
    for name, path in prepared.items():
        config = load_config(path, {})
        templates = Templates(config.input_template, config.output_template, config.system_prompt)
        used = {
            f
            for t in (config.input_template, config.output_template)
            for _l, f, _s, _c in string.Formatter().parse(t or "")
            if f
        }
        assert set(EXAMPLES[name].input_fields) <= used
        for split in ("train", "dev"):
            for i, row in enumerate(_rows(name, prepared, split)):
                example = to_example(row, config.format, templates, f"{name}:{i}", str(i), config.label_field)
                assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
                if EXAMPLES[name].output_kind == "json":
                    assert isinstance(json.loads(example.messages[-1]["content"]), dict)


def test_qa_answers_are_in_their_context_and_cited(prepared: dict[str, Path]) -> None:
    for split in ("train", "dev"):
        rows = _rows("qa_cited", prepared, split)
        assert len(rows) == SLICE
        for row in rows:
            assert row["answer"] == row["answers"][0] and row["answer"] in row["context"]


def test_reranker_positive_is_where_label_says(prepared: dict[str, Path]) -> None:
    source = {r["id"]: r for r in read_jsonl(DATA / "squad_qa" / "train.jsonl")[:SLICE]}
    rows = _rows("re_ranker", prepared, "train")
    for row in rows:
        squad = source[row["id"]]
        candidates = row["candidates"].split("\n")
        assert [c[: c.index("]") + 1] for c in candidates] == ["[1]", "[2]", "[3]", "[4]"]
        n = int(row["label"])
        assert json.loads(row["ranking_json"])[0] == row["label"]
        assert sorted(json.loads(row["ranking_json"])) == ["1", "2", "3", "4"]
        assert row["candidate_ids"][n - 1] == squad["passage_id"]
        assert squad["answers"][0] in candidates[n - 1]
        assert json.loads(row["evidence_json"]) == squad["answers"][0]  # quoted from the positive
        for i, text in enumerate(candidates):
            if i != n - 1:
                assert not any(a.lower() in text.lower() for a in squad["answers"]), (row["id"], i)
                assert row["candidate_ids"][i].split("#")[0] != squad["title"]
        assert all(len(c) < 320 for c in candidates), "a window grew far past WINDOW_CHARS"
    assert {r["label"] for r in rows} == {"1", "2", "3", "4"}


def test_unknown_example_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="intent, qa_cited, re_ranker"):
        prepare("nope", DATA, tmp_path)


def test_missing_data_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="LOOM_DATA"):
        prepare("qa_cited", tmp_path / "nowhere", tmp_path)


def test_the_match_word_is_a_question_word_only_the_positive_shares() -> None:
    from loom.agents.examples import match_word

    q = "Where did many Spanish Catholics move after the British takeover?"
    assert match_word(q, "most Spanish Catholics left for Cuba", ["Spanish ships sailed"]) == "Catholics"
    assert match_word(q, "where they went after it", ["nothing here"]) is None  # stop words only
    assert match_word(q, "the takeover by the British", ["British rule"]) == "takeover"
