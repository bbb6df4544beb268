"""Multi-turn chats: the next turn's prefill with and without the previous answer's K/V.

    python benchmarks/conversation.py            # needs the default base in $LOOM_STORE
    python benchmarks/conversation.py --chats 8 --turns 4 --new 48

Workload: ``--chats`` conversations of ``--turns`` user turns each (SNIPS dev
utterances), run turn by turn, every chat's turn submitted together; each turn's
prompt is the chat template over the whole history (earlier answers included), as
``POST /chat`` and OpenAI clients send it. Greedy, so both variants produce the same
conversations. Variants, on one engine in one process, the prefix cache emptied between:

- prompts only: the prefix cache keeps prompts (``prefix_cache_outputs=False``), so a
  turn re-prefills the previous answer;
- prompts + outputs (the default): a finished request's whole sequence is kept, so a
  turn prefills only what is new since the last answer.

Printed per variant: prompt tokens in all, tokens prefilled (the rest came from the
cache), and time to first token (p50 and p95) of the turns after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as engine_bench

from loom.engine import Engine, SamplingParams
from loom.models.loading import plan_load
from loom.store import Store


def run_chats(engine: Engine, users: list[list[str]], new: int) -> dict[str, Any]:
    params = SamplingParams(max_new_tokens=new)
    chats: list[list[dict[str, str]]] = [[] for _ in users]
    prompt_tokens, ttft_later = 0, []
    saved_before = engine.stats()["prefix_tokens_saved"]
    for turn in range(len(users[0])):
        for chat, said in zip(chats, users, strict=True):
            chat.append({"role": "user", "content": said[turn]})
        prompts = [engine.tokenize(chat) for chat in chats]
        prompt_tokens += sum(len(p) for p in prompts)
        done = engine.generate_many([(p, None) for p in prompts], params=params)
        for chat, d in zip(chats, done, strict=True):
            assert d.error is None, d.error
            chat.append({"role": "assistant", "content": d.text})
            if turn:
                ttft_later.append(d.time_to_first_token_s or 0.0)
    saved = engine.stats()["prefix_tokens_saved"] - saved_before
    return {
        "prompt_tokens": prompt_tokens,
        "prefilled": prompt_tokens - saved,
        "ttft_p50_ms": statistics.median(ttft_later) * 1000,
        "ttft_p95_ms": engine_bench.pct(ttft_later, 0.95) * 1000,
        "answers": [c[-1]["content"] for c in chats],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new", type=int, default=48, help="max new tokens per answer")
    args = ap.parse_args()
    store = Store()
    base_ref = plan_load(None, store=store, verify=False).base_ref
    engine = Engine.from_store(
        base_ref, device="cpu", store=store, max_batch_size=args.chats, max_seq_len=1024
    )
    texts = [json.loads(x)["text"] for x in engine_bench.DATA.read_text().splitlines() if x]
    users = [texts[i * args.turns : (i + 1) * args.turns] for i in range(args.chats)]
    engine.generate("hello", params=SamplingParams(max_new_tokens=2))  # warm-up
    rows = {}
    for name, keep_outputs in (("prompts only", False), ("prompts + outputs", True)):
        engine.scheduler.prefix.clear()
        engine.scheduler.remember_outputs = keep_outputs
        rows[name] = run_chats(engine, users, args.new)
    engine.shutdown()
    answers = [r.pop("answers") for r in rows.values()]
    same = "same" if answers[0] == answers[1] else "DIFFERENT"
    print(
        f"\nconversations: {args.chats} chats x {args.turns} turns, up to {args.new} new tokens per answer, "
        f"{base_ref}, cpu float32; final answers {same} in both variants"
    )
    keys = list(next(iter(rows.values())))
    print(f"{'prefix cache keeps':<20}" + "".join(f"{k:>15}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<20}" + "".join(f"{row[k]:>15.1f}" for k in keys))


if __name__ == "__main__":
    main()
