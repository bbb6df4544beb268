"""``loom bench serve``: N concurrent clients x M streamed chat requests over a mix of models
against a running server; latency / time-to-first-token percentiles, tokens/s, error rate."""

from __future__ import annotations

import asyncio
import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_PROMPTS = [
    "play some music by the beatles",
    "what is the weather like in paris tomorrow",
    "book a table for two at an italian restaurant",
    "add this song to my workout playlist",
    "will it rain in london this weekend",
    "find me a movie schedule for tonight",
    "rate this book five stars",
    "search for the creative work called the hobbit",
]


@dataclass
class BenchConfig:
    url: str
    models: list[str]
    concurrency: int = 8
    requests_per_client: int = 4
    max_tokens: int = 64
    ignore_eos: bool = True  # every request does the same work, so runs compare
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    api_key: str | None = None
    timeout_s: float = 600.0
    # Spread the clients' first requests over this many seconds. 0 (default) starts them together,
    # which with equal lengths keeps them in lock-step bursts; a ramp about one request long gives
    # the staggered arrivals of real traffic.
    ramp_up_s: float = 0.0


@dataclass
class Sample:
    client: int
    index: int
    model: str
    status: int
    started_s: float
    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    error: str | None = None


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, c: int, i: int, t0: float) -> Sample:
    model = cfg.models[(c * cfg.requests_per_client + i) % len(cfg.models)]
    prompt = cfg.prompts[(c + i) % len(cfg.prompts)]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": cfg.ignore_eos,
    }
    start = time.monotonic()
    ttft, tokens, error, status = None, 0, None, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                error = (await r.aread()).decode(errors="replace")[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = data["error"].get("message")
                        continue
                    choices = data.get("choices") or []
                    if ttft is None and any(ch.get("delta", {}).get("content") for ch in choices):
                        ttft = time.monotonic() - start
                    if data.get("usage"):
                        tokens = int(data["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Sample(c, i, model, status, start - t0, ttft, time.monotonic() - start, tokens, error)


async def run_bench(cfg: BenchConfig) -> tuple[list[Sample], float]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=cfg.url, headers=headers, limits=limits, timeout=cfg.timeout_s
    ) as client:
        t0 = time.monotonic()

        async def worker(c: int) -> list[Sample]:
            await asyncio.sleep(c * cfg.ramp_up_s / max(cfg.concurrency, 1))
            return [await _one(client, cfg, c, i, t0) for i in range(cfg.requests_per_client)]

        results = await asyncio.gather(*(worker(c) for c in range(cfg.concurrency)))
        wall = time.monotonic() - t0
    return [s for batch in results for s in batch], wall


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(samples: list[Sample], wall: float, concurrency: int) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200 and s.error is None]
    lat = [s.latency_s for s in ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    tokens = sum(s.completion_tokens for s in ok)
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "rejected_429": sum(s.status == 429 for s in samples),
        "errors_5xx": sum(s.status >= 500 for s in samples),
        "error_rate": round(1 - len(ok) / len(samples), 4) if samples else 0.0,
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
    }
    for name, values in (("latency", lat), ("ttft", ttft)):
        for q in (50, 95, 99):
            v = percentile(values, q)
            out[f"{name}_p{q}_s"] = round(v, 4) if v is not None else None
    out["ttft_mean_s"] = round(statistics.fmean(ttft), 4) if ttft else None
    return out


def write_csv(samples: list[Sample], path: Path, extra: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**(extra or {}), **asdict(s)} for s in samples]
    with path.open("w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def plot_sweep(summaries: list[dict[str, Any]], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s[key] for s in summaries]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(xs, [s["tokens_per_s"] for s in summaries], "o-", color="tab:blue")
    ax1.set_xlabel(key)
    ax1.set_ylabel("tokens/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [s["ttft_p95_s"] or 0 for s in summaries], "s--", color="tab:red")
    ax2.set_ylabel("p95 time to first token (s)", color="tab:red")
    ax1.set_title("loom bench serve")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
