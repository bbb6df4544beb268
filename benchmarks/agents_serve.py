"""The example agents measured through a running ``loom serve``: ``POST /v1/agents/{name}/run``
on the dev splits, each agent beside the base alone with the same agent prompt, one table.

    python benchmarks/agents_serve.py [--agents intent,qa_cited,re_ranker] [--limit N] [--batch 16]

The server gets a copy of the map with a ``<agent>_base`` twin per agent whose adapter is
disabled (``<AGENT>_BASE_DISABLE_ADAPTER=1``), so the twin is answered by its ``base`` fallback:
the same route, prompt, schema and decoding, without the adapter. Scoring is
``benchmarks/agents_quality.py``'s (SQuAD token F1, cited passage, top-1, label accuracy) on the
raw answer; "valid" counts answers that passed the agent's output schema on the step that was
meant to answer (step 0 for the agent, the base fallback for its twin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from agents_quality import score

from loom.agents.examples import EXAMPLES, default_data_dir, prepare, read_jsonl
from loom.serve.server import free_port, wait_healthy

MAP = Path(__file__).resolve().parents[1] / "examples" / "agents" / "AGENT_MODEL_MAP.json"
PAYLOAD_FIELDS = {name: list(agent.input_fields) for name, agent in EXAMPLES.items()}


def twin_map(src: Path, names: list[str], out: Path) -> tuple[Path, dict[str, str]]:
    doc = json.loads(src.read_text())
    agents = {}
    for name in names:
        entry = {k: v for k, v in doc["agents"][name].items() if k != "fallback"}
        agents[name] = entry
        agents[f"{name}_base"] = {**entry, "fallback": ["base"]}
    sources = doc.get("sources")
    new = {"agents": agents, **({"sources": str((src.parent / sources).resolve())} if sources else {})}
    path = out / "AGENT_MODEL_MAP.json"
    path.write_text(json.dumps(new, indent=2))
    return path, {f"{n.upper()}_BASE_DISABLE_ADAPTER": "1" for n in names}


def run(
    url: str, agent: str, rows: list[dict[str, Any]], fields: list[str], batch: int
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=3600) as http:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            body = {"inputs": [{f: r[f] for f in fields} for r in chunk]}
            t0 = time.monotonic()
            r = http.post(f"/v1/agents/{agent}/run", json=body)
            r.raise_for_status()
            took = time.monotonic() - t0
            for item in r.json()["data"]:
                out.append({**item, "batch_s": took})
            print(f"  {agent}: {len(out)}/{len(rows)}", file=sys.stderr, flush=True)
    return out


def summarize(
    name: str, variant: str, rows: list[dict[str, Any]], results: list[dict[str, Any]], step: int
) -> dict[str, Any]:
    scores: dict[str, list[float]] = {}
    valid = 0
    for row, res in zip(rows, results, strict=True):
        for k, v in score(name, row, res.get("raw", "")).items():
            scores.setdefault(k, []).append(v)
        valid += res.get("error") is None and res["fallback"]["step"] == step
    seconds = sum({id(r["batch_s"]): r["batch_s"] for r in results}.values())
    return {
        "agent": name,
        "model": variant,
        **{
            k: round(100 * statistics.fmean(v), 1)
            if k != "f1" and k != "exact_match"
            else round(statistics.fmean(v), 1)
            for k, v in scores.items()
        },
        "schema_valid_%": round(100 * valid / len(rows), 1),
        "n": len(rows),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="intent,qa_cited,re_ranker")
    ap.add_argument("--map", type=Path, default=MAP)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-base", action="store_true", help="Skip the base twins (measured before).")
    args = ap.parse_args()
    names = args.agents.split(",")
    data = args.data or default_data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        dev = {}
        for name in names:
            prepare(name, data, prepared)
            dev[name] = read_jsonl(EXAMPLES[name].dev_file(data, prepared))[: args.limit]
        path, env = twin_map(args.map, names, Path(tmp))
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "loom",
            "serve",
            "--port",
            str(port),
            "--agents",
            str(path),
            "--max-batch-size",
            str(args.batch),
            "--max-seq-len",
            "1024",
            "--log-level",
            "warning",
        ]
        server = subprocess.Popen(cmd, env={**os.environ, **env})
        table = []
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, timeout=600)
            for name in names:
                twins = (("adapter", name, 0), ("base, same prompt", f"{name}_base", 1))
                for variant, agent, step in twins[: 1 if args.no_base else 2]:
                    results = run(url, agent, dev[name], PAYLOAD_FIELDS[name], args.batch)
                    table.append(summarize(name, variant, dev[name], results, step))
        finally:
            server.terminate()
            server.wait(60)
    keys = sorted({k for row in table for k in row} - {"agent", "model", "n", "seconds"})
    print(f"\n{'agent':10} {'model':18}" + "".join(f"{k:>22}" for k in keys) + f"{'n':>6}{'seconds':>9}")
    for row in table:
        print(
            f"{row['agent']:10} {row['model']:18}"
            + "".join(f"{row.get(k, ''):>22}" for k in keys)
            + f"{row['n']:>6}{row['seconds']:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
