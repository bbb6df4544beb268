"""Golden sets for the example agents (loom.agents.examples), built from the dev splits of the
shared data, deterministically (seeded per row, no state):

- ``intent``: each SNIPS dev row; input ``{"text"}``, expected ``{"intent": label}``,
  category = the label. Graded by the ``json`` (or ``auto``) scorer.
- ``qa_cited``: each SQuAD dev question; input ``{passage_id, context, question}``, expected =
  every reference answer, citation ``["squad:<passage_id>"]``, category = the article title.
  Plus ``UNANSWERABLE`` DYNAMIC rows, category ``unanswerable``: a dev question paired with a
  passage of another article that mentions none of its answers; the agent must defer or refuse.
  Graded by ``exact``/``contains``/``f1``; the DYNAMIC rows by refusal.
- ``re_ranker``: each row of ``rerank_rows`` on the dev split; input ``{question, candidates}``,
  expected ``{"ranking.0": label}`` (the first-ranked candidate is the one holding the answer),
  category = the article title. The ``json`` scorer reads the dotted path, so ``json``/``auto``
  grade top-1 accuracy.

SQuAD-derived golden sets stay under CC BY-SA 4.0 (Rajpurkar et al., 2016); SNIPS is CC0.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from loom.agents.examples import EXAMPLES, SEED, Row, default_data_dir, read_jsonl, rerank_rows, write_jsonl
from loom.errors import LoomError
from loom.evals.golden import GoldenRow
from loom.evals.scorers import contains_answer

UNANSWERABLE = 30  # DYNAMIC rows in the qa_cited golden set (10% of its 300 answerable ones)
DEFAULT_GOLDEN_OUT = Path("runs") / "golden"


def intent_golden(rows: list[Row]) -> list[GoldenRow]:
    return [
        GoldenRow(
            id=str(r["id"]),
            input={"text": r["text"]},
            expected={"intent": r["label"]},
            category=str(r["label"]),
        )
        for r in rows
    ]


def _unanswerable(rows: list[Row], count: int) -> list[GoldenRow]:
    """``count`` questions, each with a passage of another article that mentions none of its
    reference answers (so the passage cannot answer it)."""
    passages: dict[str, Row] = {}
    for r in rows:
        passages.setdefault(str(r["passage_id"]), r)
    chosen = random.Random(f"{SEED}:unanswerable").sample(sorted(rows, key=lambda r: str(r["id"])), count)
    out = []
    for r in chosen:
        rng = random.Random(f"{SEED}:unanswerable:{r['id']}")
        others = [p for p in sorted(passages) if passages[p]["title"] != r["title"]]
        answers = [str(a) for a in r["answers"]]
        for pid in rng.sample(others, len(others)):
            context = str(passages[pid]["context"])
            if not any(contains_answer(context, a) for a in answers):
                break
        else:
            raise LoomError(f"squad row {r['id']}: every other passage mentions one of its answers")
        out.append(
            GoldenRow(
                id=f"unanswerable-{r['id']}",
                input={"passage_id": pid, "context": context, "question": r["question"]},
                type="DYNAMIC",
                category="unanswerable",
            )
        )
    return out


def qa_cited_golden(rows: list[Row]) -> list[GoldenRow]:
    answerable = [
        GoldenRow(
            id=str(r["id"]),
            input={"passage_id": r["passage_id"], "context": r["context"], "question": r["question"]},
            expected=r["answers"],
            citation=[f"squad:{r['passage_id']}"],
            category=str(r["title"]),
        )
        for r in rows
    ]
    return answerable + _unanswerable(rows, min(UNANSWERABLE, len(rows)))


def re_ranker_golden(rows: list[Row]) -> list[GoldenRow]:
    titles = {r["id"]: str(r["title"]) for r in rows}
    return [
        GoldenRow(
            id=str(r["id"]),
            input={"question": r["question"], "candidates": r["candidates"]},
            expected={"ranking.0": r["label"]},
            category=titles[r["id"]],
        )
        for r in rerank_rows(rows)
    ]


BUILDERS: dict[str, Callable[[list[Row]], list[GoldenRow]]] = {
    "intent": intent_golden,
    "qa_cited": qa_cited_golden,
    "re_ranker": re_ranker_golden,
}


def build_example_golden(name: str, data_dir: Path | None, out_dir: Path) -> Path:
    """Write example agent ``name``'s golden set as out_dir/NAME.jsonl; returns its path."""
    if name not in BUILDERS:
        raise LoomError(f"no example golden set {name!r}; choose one of {', '.join(BUILDERS)}")
    agent = EXAMPLES[name]
    rows = read_jsonl((data_dir or default_data_dir()) / agent.task / "dev.jsonl")
    target = out_dir / f"{name}.jsonl"
    write_jsonl(target, [r.model_dump(mode="json") for r in BUILDERS[name](rows)])
    return target
