"""The example agents: their data, derived deterministically from ../shared/data, and
ready-to-run training configs.

    from loom.agents.examples import EXAMPLES, prepare
    config = prepare("qa_cited", out_dir=Path("runs/agents"))   # writes derived JSONL + config
    # then: loom train --config <config>

``examples/agents/NAME.yaml`` holds every training setting; its ``train_files`` use
``{data}`` (the shared data folder) and ``{out}`` (prepare's out_dir), which prepare()
fills in. Command line: ``python -m loom.agents.examples prepare NAME [--out DIR]``.

SQuAD derivatives stay under CC BY-SA 4.0 (see ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from loom.errors import LoomError

REPO = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO / "examples" / "agents"
DEFAULT_OUT = Path("runs") / "agents"
SEED = 1234
WINDOW_CHARS = 200  # re_ranker candidate length: 4 of them keep a prompt near 250 tokens
CANDIDATES = 4

Row = dict[str, Any]


def default_data_dir() -> Path:
    """$LOOM_DATA, else the first ``shared/data`` beside the repo or one of its parents
    (the main checkout has it at ../shared/data, worktrees further up)."""
    env = os.environ.get("LOOM_DATA")
    if env:
        return Path(env)
    for folder in REPO.parents:
        if (folder / "shared" / "data").is_dir():
            return folder / "shared" / "data"
    return REPO.parent / "shared" / "data"


# ------------------------------------------------------------------ derived rows
def qa_rows(rows: list[Row]) -> list[Row]:
    """SQuAD rows with ``answer`` = the first reference answer (the training target)."""
    return [{**r, "answer": r["answers"][0]} for r in rows]


def _window(text: str, lo: int, hi: int, size: int, rng: random.Random) -> str:
    """A ~size-char slice of text that contains text[lo:hi], at a random offset, widened
    to whole words (widening only, so the kept span is never cut)."""
    if len(text) <= size:
        return " ".join(text.split())
    first = max(0, min(hi - size, len(text) - size))
    last = max(first, min(lo, len(text) - size))
    start = rng.randint(first, last)
    end = max(start + size, hi)
    start = text.rfind(" ", 0, start) + 1 if start > 0 else 0
    stop = text.find(" ", end)
    # one line per candidate: a passage's own line breaks would blur where [n] starts
    return " ".join(text[start : len(text) if stop < 0 else stop].split())


_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
_STOP = frozenset((
    "what", "which", "when", "where", "who", "whom", "whose", "why", "how", "does", "did", "is",
    "are", "was", "were", "the", "this", "that", "these", "those", "with", "from", "into", "about",
    "than", "then", "there", "their", "they", "them", "have", "has", "had", "been", "being", "also",
    "other", "some", "such", "many", "much", "most", "more", "what's", "name", "called", "after",
    "before", "during", "between", "under", "over", "upon", "until", "while", "because", "would",
    "could", "should",
))  # fmt: skip


def match_word(question: str, positive: str, negatives: list[str]) -> str | None:
    """The question's longest content word found in the positive window and in no negative
    (None when there is none): the clue a word-overlap ranker uses, as a word to copy."""

    def words(text: str) -> set[str]:
        return {w.lower() for w in _WORD.findall(text)}

    elsewhere = set().union(*(words(n) for n in negatives))
    inside = words(positive)
    found = [
        w
        for w in _WORD.findall(question)
        if len(w) >= 4 and w.lower() not in _STOP and w.lower() in inside and w.lower() not in elsewhere
    ]
    return max(found, key=len) if found else None


def _mentions(window: str, answers: list[str]) -> bool:
    low = window.lower()
    return any(a.strip().lower() in low for a in answers if a.strip())


def rerank_rows(rows: list[Row], seed: int = SEED) -> list[Row]:
    """One re-ranking row per SQuAD question: the question and 4 numbered candidates.

    The positive is a window of the question's own passage around its first answer;
    the 3 negatives are windows of passages from *other articles* (so a negative cannot
    also answer the question, which other paragraphs of the same article sometimes do),
    and no negative window mentions any reference answer. The positive's position is
    uniform over 1..4; each row has its own seeded generator, so a row does not change
    when others are added."""
    passages: dict[str, Row] = {}
    for r in rows:
        passages.setdefault(r["passage_id"], r)
    pool = sorted(passages)
    out = []
    for r in rows:
        rng = random.Random(f"{seed}:{r['id']}")
        answer = r["answers"][0]
        at = r["context"].find(answer)
        if at < 0:
            raise LoomError(f"squad row {r['id']}: answer {answer!r} is not in its context; fix the row")
        positive = _window(r["context"], at, at + len(answer), WINDOW_CHARS, rng)
        others = [p for p in pool if passages[p]["title"] != r["title"]]
        if len(others) < CANDIDATES - 1:
            raise LoomError(
                f"re_ranker needs passages from at least {CANDIDATES - 1} other articles than "
                f"{r['title']!r}; give more SQuAD rows"
            )
        negatives: list[tuple[str, str]] = []
        for pid in rng.sample(others, len(others)):
            text = passages[pid]["context"]
            mid = rng.randint(0, len(text))
            window = _window(text, mid, mid, WINDOW_CHARS, rng)
            if not _mentions(window, r["answers"]):
                negatives.append((pid, window))
            if len(negatives) == CANDIDATES - 1:
                break
        slot = rng.randrange(CANDIDATES)
        order = [*negatives[:slot], (r["passage_id"], positive), *negatives[slot:]]
        numbers = [str(i + 1) for i in range(CANDIDATES)]
        ranking = [numbers[slot], *[n for n in numbers if n != numbers[slot]]]
        out.append(
            {
                "id": r["id"],
                "question": r["question"],
                "candidates": "\n".join(f"[{i + 1}] {text}" for i, (_pid, text) in enumerate(order)),
                "candidate_ids": [pid for pid, _text in order],
                "ranking_json": json.dumps(ranking),
                # the answer span, quoted before the ranking: it gives every example several
                # tokens that can only be right by finding the passage (a ranking alone has one)
                "evidence_json": json.dumps(answer),
                # a question word only the positive window shares (else the answer span)
                "match_json": json.dumps(
                    match_word(r["question"], positive, [t for _p, t in negatives]) or answer
                ),
                "label": numbers[slot],
                "answers": r["answers"],
            }
        )
    return out


# ------------------------------------------------------------------ the examples
@dataclass(frozen=True)
class ExampleAgent:
    name: str
    config: Path  # the training config template in examples/agents
    description: str
    task: str  # the folder in the shared data
    input_fields: tuple[str, ...]
    output_kind: Literal["json", "text"]
    derive: Callable[[list[Row]], list[Row]] | None = None  # None: the shared rows as they are

    def split_path(self, split: str, data_dir: Path, out_dir: Path) -> Path:
        """Where prepare() leaves (or finds) the rows of ``split`` (train or dev)."""
        if self.derive is None:
            return data_dir / self.task / f"{split}.jsonl"
        return out_dir / self.name / f"{split}.jsonl"

    def dev_file(self, data_dir: Path | None = None, out_dir: Path = DEFAULT_OUT) -> Path:
        """The dev rows to measure on (prepare() first, for derived data)."""
        return self.split_path("dev", data_dir or default_data_dir(), out_dir)


EXAMPLES: dict[str, ExampleAgent] = {
    agent.name: agent
    for agent in (
        ExampleAgent(
            "intent",
            CONFIG_DIR / "intent.yaml",
            "SNIPS voice-assistant request -> its intent, one of 6 labels, as JSON",
            "snips_intent",
            ("text",),
            "json",
        ),
        ExampleAgent(
            "qa_cited",
            CONFIG_DIR / "qa_cited.yaml",
            "SQuAD passage + question -> a short answer and the passage's citation marker",
            "squad_qa",
            ("passage_id", "context", "question"),
            "text",
            qa_rows,
        ),
        ExampleAgent(
            "re_ranker",
            CONFIG_DIR / "re_ranker.yaml",
            "question + 4 numbered passages -> JSON ranking with the passage that answers it first",
            "squad_qa",
            ("question", "candidates"),
            "json",
            rerank_rows,
        ),
    )
}


def read_jsonl(path: Path) -> list[Row]:
    if not path.is_file():
        raise LoomError(
            f"{path}: no such file; set LOOM_DATA to the folder holding snips_intent/ and squad_qa/"
        )
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def example(name: str) -> ExampleAgent:
    try:
        return EXAMPLES[name]
    except KeyError:
        raise LoomError(f"no example agent {name!r}; choose one of {', '.join(EXAMPLES)}") from None


def prepare(name: str, data_dir: Path | None = None, out_dir: Path = DEFAULT_OUT) -> Path:
    """Write ``name``'s derived train/dev JSONL (if any) under out_dir/name/ and a training
    config with real ``train_files`` as out_dir/name.yaml; returns that config's path."""
    agent = example(name)
    data_dir = (data_dir or default_data_dir()).resolve()
    out_dir = out_dir.resolve()
    if agent.derive is not None:
        for split in ("train", "dev"):
            rows = read_jsonl(data_dir / agent.task / f"{split}.jsonl")
            write_jsonl(agent.split_path(split, data_dir, out_dir), agent.derive(rows))
    config = yaml.safe_load(agent.config.read_text())
    config["train_files"] = [_fill_paths(p, data_dir, out_dir) for p in config["train_files"]]
    for path in config["train_files"]:
        if not Path(path).is_file():
            raise LoomError(f"{agent.config}: train file {path} does not exist; check LOOM_DATA ({data_dir})")
    target = out_dir / f"{name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    header = f"# prepared from {agent.config} by loom.agents.examples.prepare; do not edit\n"
    target.write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return target


def _fill_paths(template: str, data_dir: Path, out_dir: Path) -> str:
    # plain replacement, not str.format: the same files hold the templates' own braces
    return re.sub(r"\{(data|out)\}", lambda m: str(data_dir if m[1] == "data" else out_dir), template)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loom.agents.examples", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write derived data and a ready config; print its path")
    prep.add_argument("names", nargs="+", choices=sorted(EXAMPLES))
    prep.add_argument("--data", type=Path, default=None, help="shared data folder (default: $LOOM_DATA)")
    prep.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    for name in args.names:
        print(prepare(name, args.data, args.out))


if __name__ == "__main__":
    main()
