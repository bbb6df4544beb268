"""Prometheus metrics: request counters and latency histograms recorded by the routes,
engine gauges and adapter counters read from the engine at scrape time."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only double the scrape size

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineCollector(Collector):
    """Reads the engine's own counters when Prometheus scrapes, so there is one source of truth."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s is None:  # still loading
            return
        yield GaugeMetricFamily("loom_queue_depth", "Requests waiting for a batch slot", s["queue_depth"])
        yield GaugeMetricFamily("loom_running_batch_size", "Requests in the running batch", s["batch_size"])
        yield GaugeMetricFamily(
            "loom_prefill_tokens_pending",
            "Prompt tokens of a long prompt still to prefill (chunked)",
            s["prefilling_tokens_left"],
        )
        yield GaugeMetricFamily(
            "loom_resident_adapters", "Adapters resident in engine slots", len(s["resident_adapters"])
        )
        yield GaugeMetricFamily("loom_adapters_loading", "Adapter reads under way", s["adapters_loading"])
        yield GaugeMetricFamily(
            "loom_adapters_waiting_for_slot",
            "Adapters read and waiting for a free slot",
            s["adapters_waiting_for_slot"],
        )
        c = s["adapter_counters"]
        for key, name, doc in (
            ("loads", "loom_adapter_loads", "Adapters installed into a slot"),
            ("load_failures", "loom_adapter_load_failures", "Adapter loads that failed"),
            ("evictions", "loom_adapter_evictions", "Adapters evicted to make room"),
            ("swaps", "loom_adapter_hot_swaps", "Hot-swaps of an adapter name to another version"),
            ("slot_waits", "loom_adapter_slot_waits", "Adapters that waited for a slot (all were in use)"),
            ("alias_moves", "loom_adapter_alias_moves", "Alias moves in the store that rerouted a name"),
        ):
            yield CounterMetricFamily(name, doc, c.get(key, 0))
        yield CounterMetricFamily("loom_engine_steps", "Decode steps run", s["steps"])
        yield CounterMetricFamily(
            "loom_prefix_cache_hits", "Prompts that reused cached prefix K/V", s["prefix_cache_hits"]
        )
        yield CounterMetricFamily(
            "loom_prefix_cache_tokens_saved",
            "Prompt tokens not prefilled thanks to it",
            s["prefix_tokens_saved"],
        )
        yield GaugeMetricFamily(
            "loom_prefix_cache_bytes", "Bytes held by the prefix cache", s["prefix_cache_bytes"]
        )
        yield CounterMetricFamily("loom_oom_events", "Out-of-memory errors in the engine", s["oom_events"])


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loom_requests",
            "HTTP requests by route, model and status",
            ["route", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("loom_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("loom_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram(
            "loom_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loom_inter_token_latency_seconds",
            "Time between generated tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "loom_request_duration_seconds",
            "End-to-end request time",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("loom_requests_in_flight", "Generation requests admitted", registry=r)
        self.rejected = Counter("loom_rejected", "Requests refused before the engine", ["reason"], registry=r)
        self.swap_failures = Counter("loom_adapter_hot_swap_failures", "Hot-swaps that failed", registry=r)
        self.preload_failures = Counter(
            "loom_model_preload_failures", "Base or adapter preloads that failed", registry=r
        )
        self.cancelled = Counter("loom_cancelled", "Generations cancelled by a client disconnect", registry=r)
        self.agent_runs = Counter(
            "loom_agent_runs",
            "Agent payloads answered, by the chain step kind that answered (adapter, base, python, "
            "endpoint, stub, legacy; none: every step failed) and confidence",
            ["agent", "answered_by", "confidence"],
            registry=r,
        )
        self.agent_fallbacks = Counter(
            "loom_agent_fallbacks", "Agent payloads answered by a fallback step", ["agent"], registry=r
        )
        self.unknown_citations = Counter(
            "loom_citations_unknown_sources",
            "Citations of source ids the source registry does not know (see `loom sources unknown`)",
            ["agent"],
            registry=r,
        )
        r.register(EngineCollector(engine_stats))

    def observe_completion(self, model: str, prompt_tokens: int, completion: Any) -> None:
        """Token counts and latencies of one finished completion (loom.engine.Completion)."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(len(completion.token_ids))
        if completion.time_to_first_token_s is not None:
            self.ttft.labels(model).observe(completion.time_to_first_token_s)
        times = completion.token_times
        for a, b in itertools.pairwise(times):
            self.itl.observe(b - a)
