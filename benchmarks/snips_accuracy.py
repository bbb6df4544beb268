"""SNIPS intent accuracy on dev: the default base vs. the base + a trained adapter.

    python benchmarks/snips_accuracy.py --adapter snips-intent@v1 [--limit 300]

The adapter is prompted exactly as it was trained (its training summary
records the input template and system prompt; the chat template is the base's). The base gets
the same prompt, and also a fairer one that lists the six labels, since it
has never seen the label names. Greedy decoding; an answer counts when its
JSON parses and its "intent" equals the gold label.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from loom.models import load_model
from loom.store import Store

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips_intent" / "dev.jsonl"
LABELS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchScreeningEvent"]
LISTED = (
    "Classify the intent of this request as one of "
    + ", ".join(LABELS)
    + '. Answer with JSON like {{"intent": "GetWeather"}}.\nRequest: {text}'
)


def parse_intent(text: str) -> str | None:
    start, end = text.find("{"), text.find("}")
    try:
        value = json.loads(text[start : end + 1])
    except (ValueError, TypeError):
        return None
    return value.get("intent") if isinstance(value, dict) else None


def accuracy(
    model: Any, tok: Any, rows: list[dict[str, str]], template: str, system: str | None, batch: int = 32
) -> tuple[float, float, list[str]]:
    tok.padding_side = "left"
    correct, answers, started = 0, [], time.monotonic()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        prompts = [
            tok.apply_chat_template(
                ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": template.format(text=r["text"])}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for r in chunk
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            answers.append(text)
            correct += parse_intent(text) == r["label"]
    return correct / len(rows), time.monotonic() - started, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter ref in the store")
    ap.add_argument("--base", default=None, help="base ref (default: the store's default)")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()][: args.limit]
    store = Store()
    manifest = store.resolve(args.adapter).manifest
    summary = manifest.training_summary or {}
    prompting = summary.get("prompting") or {}
    trained_template = prompting.get("input_template") or "{text}"
    system = prompting.get("system_prompt")

    base = load_model(args.base, store=store, device="cpu")
    tuned = load_model(args.base, [args.adapter], store=store, device="cpu")
    results = {}
    for label, lm, template in [
        ("base, training prompt", base, trained_template),
        ("base, prompt listing the labels", base, LISTED),
        (f"base + {args.adapter}", tuned, trained_template),
    ]:
        acc, seconds, answers = accuracy(lm.model, lm.tokenizer, rows, template, system)
        results[label] = {"accuracy": acc, "seconds": round(seconds, 1), "sample": answers[:3]}
    print(f"SNIPS dev, {len(rows)} rows, greedy, CPU fp32")
    print(f"{'model':45} {'accuracy':>9} {'eval s':>8}")
    for label, r in results.items():
        print(f"{label:45} {r['accuracy']:>9.1%} {r['seconds']:>8}")
    train = {k: summary.get(k) for k in ("train_seconds", "steps", "final_train_loss", "tokens_per_second")}
    print("training:", json.dumps(train))
    if args.json:
        args.json.write_text(json.dumps({"rows": len(rows), "results": results, "training": train}, indent=2))


if __name__ == "__main__":
    main()
