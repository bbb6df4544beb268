"""Dev-split quality of the example agents (loom.agents.examples): adapter vs. base alone.

    python benchmarks/agents_quality.py                       # all three, 300 dev rows each
    python benchmarks/agents_quality.py --agents intent --limit 50 --json out.json

Each agent's prompt is rebuilt exactly as ``loom train`` rendered it: the adapter's training
summary gives the system prompt and input/output templates, loom.data.formats turns the dev
row into chat messages and loom.train.tokenize.Renderer renders the prompt part (the base's
chat template over [system, user] with the generation prompt). The base alone gets the same
prompt ids. All rows of a model go through Loom's engine in one burst, greedy.

Metrics: intent: accuracy (the whole output parses as JSON and "intent" is the gold label)
and valid JSON; qa_cited: SQuAD token F1 and exact match of the text before the citation
(max over the reference answers, SQuAD normalisation) and the share of answers whose
citations all name the right passage (at least one); re_ranker: top-1 (ranking[0] is the
positive) and valid JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from loom.agents.examples import DEFAULT_OUT, EXAMPLES, prepare, read_jsonl
from loom.data.formats import RowFormat, Templates, to_example
from loom.engine import Engine, SamplingParams
from loom.evals.scorers import normalize_answer, token_f1
from loom.store import Store
from loom.train.tokenize import Renderer

MAX_NEW_TOKENS = {"intent": 16, "qa_cited": 64, "re_ranker": 72}
CITATION = re.compile(r"<<SRC:([^>]*)>>")


# ------------------------------------------------------------------ prompts
def prompt_ids(tokenizer: Any, prompting: dict[str, Any], row: dict[str, Any], where: str) -> list[int]:
    """The prompt tokens of ``row`` as training tokenized them (everything before the response)."""
    templates = Templates(
        prompting.get("input_template"), prompting.get("output_template"), prompting.get("system_prompt")
    )
    example = to_example(row, RowFormat(prompting.get("format") or "fields"), templates, where, where)
    renderer = Renderer(tokenizer, prompting.get("prompt_template"))
    ids: list[int] = []
    for text, trained in renderer.segments(example):
        if trained:
            return ids
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    raise ValueError(f"{where}: the rendered example has no response segment")


# ------------------------------------------------------------------ metrics
def parse_json(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score(agent: str, row: dict[str, Any], output: str) -> dict[str, float]:
    if agent == "intent":
        value = parse_json(output)
        return {
            "accuracy": float(value is not None and value.get("intent") == row["label"]),
            "valid_json": float(value is not None and isinstance(value.get("intent"), str)),
        }
    if agent == "qa_cited":
        answer = CITATION.split(output, maxsplit=1)[0].strip()
        cited = CITATION.findall(output)
        return {
            "f1": 100 * max(token_f1(answer, a) for a in row["answers"]),
            "exact_match": 100
            * max(float(normalize_answer(answer) == normalize_answer(a)) for a in row["answers"]),
            "cited_right_passage": float(
                bool(cited) and all(c == f"squad:{row['passage_id']}" for c in cited)
            ),
        }
    value = parse_json(output)
    ranking = value.get("ranking") if value else None
    valid = isinstance(ranking, list) and bool(ranking)
    return {
        "top1": float(valid and str(ranking[0]) == row["label"]),  # type: ignore[index]
        "valid_json": float(valid),
    }


# ------------------------------------------------------------------ runs
def run_agent(
    engine: Engine, store: Store, agent: str, ref: str, rows: list[dict[str, Any]], base: bool = True
) -> list[dict[str, Any]]:
    """Score the adapter and the base alone on the same prompts; one result row per metric."""
    resolved = store.resolve(ref)  # one concrete version for the whole run, named in the table
    ref = resolved.ref
    prompting = (resolved.manifest.training_summary or {}).get("prompting") or {}
    prompts = [prompt_ids(engine.tokenizer, prompting, r, f"{agent} dev row {i}") for i, r in enumerate(rows)]
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS[agent], temperature=0.0)
    results = []
    models = [(ref, ref), (f"base {engine.base_ref}", None)][: 2 if base else 1]
    for model, adapter in models:
        started = time.monotonic()
        done = engine.generate_many([(p, adapter) for p in prompts], params=params)
        seconds = time.monotonic() - started
        scores = [score(agent, r, c.text) for r, c in zip(rows, done, strict=True)]
        for metric in scores[0]:
            value = sum(s[metric] for s in scores) / len(scores)
            results.append(
                {
                    "agent": agent,
                    "model": model,
                    "metric": metric,
                    "value": round(value if metric in ("f1", "exact_match") else 100 * value, 1),
                    "n": len(rows),
                    "seconds": round(seconds, 1),
                    "outputs": [c.text for c in done] if metric == next(iter(scores[0])) else [],
                }
            )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    ap.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="AGENT=REF",
        help="adapter ref per agent (default: the config's adapter_name, i.e. @current)",
    )
    ap.add_argument("--limit", type=int, default=None, help="first N dev rows per agent")
    ap.add_argument("--data", type=Path, default=None, help="shared data folder (default: $LOOM_DATA)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where prepare() writes derived data")
    ap.add_argument("--no-base", action="store_true", help="measure the adapters only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    refs = dict(item.split("=", 1) for item in args.adapter)
    store = Store()
    engine = Engine.from_store(store=store, max_batch_size=32, max_seq_len=768, kv_cache_mb=1536)
    results: list[dict[str, Any]] = []
    try:
        for agent in args.agents:
            config = prepare(agent, args.data, args.out)
            ref = refs.get(agent) or str(yaml.safe_load(config.read_text())["adapter_name"])
            rows = read_jsonl(EXAMPLES[agent].dev_file(args.data, args.out))[: args.limit]
            results += run_agent(engine, store, agent, ref, rows, base=not args.no_base)
    finally:
        engine.shutdown()
    print(f"{'agent':10} {'model':44} {'metric':20} {'value':>7} {'n':>5} {'seconds':>8}")
    for r in results:
        print(
            f"{r['agent']:10} {r['model']:44} {r['metric']:20} {r['value']:>7} {r['n']:>5} {r['seconds']:>8}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")  # with every output, once per model


if __name__ == "__main__":
    main()
