"""vLLM's own Prometheus metrics, scraped in the background and served relabelled on Loom's
/metrics (``vllm:num_requests_running`` -> ``loom_vllm_num_requests_running``), so one scrape
of the gateway sees both. Scraping runs on its own thread: /metrics and /info read the last
scrape and never wait on vLLM from the event loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import httpx
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("loom.vllm")
PREFIX = "vllm:"
RELABELLED = "loom_vllm_"


class Scraper:
    def __init__(self, url: str, headers: dict[str, str] | None = None, interval_s: float = 2.0) -> None:
        self.url, self.headers, self.interval_s = url, headers or {}, interval_s
        self.families: list[Metric] = []
        self.values: dict[str, float] = {}  # sample name -> value summed over labels
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loom-vllm-scrape", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def scrape(self) -> None:
        try:
            text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=5.0).text
        except httpx.HTTPError:
            self.failures += 1  # vLLM restarting: its series vanish rather than go stale
            self.families, self.values = [], {}
            return
        parsed = list(text_string_to_metric_families(text))  # parsed once, for both views
        families = [relabel(f) for f in parsed if f.name.startswith(PREFIX)]
        values: dict[str, float] = {}
        for family in parsed:
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        self.families, self.values = families, values

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape()
            self._stop.wait(self.interval_s)


def relabel(family: Metric) -> Metric:
    name = RELABELLED + family.name.removeprefix(PREFIX)
    out = Metric(name, f"vLLM: {family.documentation}", family.type, family.unit)
    for s in family.samples:
        out.add_sample(RELABELLED + s.name.removeprefix(PREFIX), s.labels, s.value, s.timestamp, s.exemplar)
    return out


class VLLMCollector(Collector):
    """Registered in Loom's registry: yields the last scrape's families."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def collect(self) -> Iterator[Metric]:
        yield from self.scraper.families
