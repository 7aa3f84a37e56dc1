"""The server's Prometheus metrics, kept by `prometheus_client` in one registry per app.

Imports: prometheus_client and the engine's snapshot (a dict); nothing else of herd. Each app owns a
CollectorRegistry (never the process-global one), so several apps in one process keep apart. The HTTP side counts
answers, tokens and latencies as they happen; the engine's own state (queue, rows, KV pages, prefix hits, ...) is
read from `Engine.snapshot()` at scrape time. The text is the classic Prometheus format (0.0.4) without the
OpenMetrics `_created` series, so the names are exactly herd's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help, the Engine.snapshot() key it reads)
ENGINE_METRICS = (
    ("herd_queue_depth", "gauge", "Requests waiting for a batch row.", "waiting"),
    ("herd_running_requests", "gauge", "Requests in the running batch.", "running"),
    ("herd_kv_pages_used", "gauge", "KV-cache pages held by running requests.", "pages_used"),
    ("herd_kv_pages_total", "gauge", "KV-cache pages in the pool.", "pages_total"),
    ("herd_kv_cache_bytes", "gauge", "Bytes of the KV-cache pool.", "kv_bytes"),
    ("herd_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
     "prefix_hit_tokens"),
    ("herd_prefill_tokens_total", "counter", "Prompt tokens computed.", "prefill_tokens"),
    ("herd_prefill_chunks_total", "counter", "Prefill chunks computed (at most --prefill-chunk tokens each).",
     "prefill_chunks"),
    ("herd_preemptions_total", "counter", "Requests preempted to free KV memory.", "preempted"),
    ("herd_rejected_requests_total", "counter", "Requests refused with 429 (queue full).", "rejected"),
    ("herd_cancelled_requests_total", "counter", "Requests cancelled (client gone).", "cancelled"),
    ("herd_spec_draft_tokens_total", "counter", "Speculative decoding: tokens guessed and verified.",
     "spec_drafted_tokens"),
    ("herd_spec_accepted_tokens_total", "counter", "Speculative decoding: guessed tokens kept.",
     "spec_accepted_tokens"),
)


class _EngineCollector:
    """The engine's counters and gauges, read from one snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        for name, kind, help, key in ENGINE_METRICS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help, value=snap.get(key, 0))
        # per draft position j (0 = the first guess of a step): guesses verified there, and kept there
        for name, help, key in (("herd_spec_proposed_by_position_total", "Speculative guesses verified, by draft "
                                 "position.", "spec_proposed_at"),
                                ("herd_spec_accepted_by_position_total", "Speculative guesses kept, by draft "
                                 "position.", "spec_accepted_at")):
            family = CounterMetricFamily(name, help, labels=["position"])
            for j, value in enumerate(snap.get(key, [])):
                family.add_metric([str(j)], value)
            yield family


class _Registry(CollectorRegistry):
    """A registry whose scrape leaves out the `_created` timestamps prometheus_client adds to counters and
    histograms (without touching the library's process-wide switch)."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """Counters and histograms of one app; `render()` is the /metrics body."""

    def __init__(self, engine_snapshot: Callable[[], dict]):
        self.registry = r = _Registry()
        self.requests = Counter("herd_requests_total", "HTTP requests answered, by endpoint and status.",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens_total", "Prompt tokens of answered requests.", registry=r)
        self.completion_tokens = Counter("herd_generation_tokens_total", "Tokens generated.", registry=r)
        r.register(_EngineCollector(engine_snapshot))
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tpot = Histogram("herd_time_per_output_token_seconds", "Time between consecutive tokens of a request.",
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56), registry=r)
        self.latency = Histogram("herd_request_duration_seconds", "Time from request arrival to its last byte.",
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
