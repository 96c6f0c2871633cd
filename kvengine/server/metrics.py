"""Prometheus metrics of one server: a private registry with latency histograms fed by the engine thread,
and gauges/counters read from an EngineStats snapshot at scrape time (KV blocks, prefix hits, queues).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvengine.engine.stats import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector(Collector):
    """Turns the latest EngineStats into metric families when the registry is scraped."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None
        self.model_name = ""  # the vllm:-named families' model_name label (ServerMetrics.name_model)

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        gauges = {
            "kvengine_kv_blocks_total": ("KV cache blocks in the pool", s.blocks_total),
            "kvengine_kv_blocks_used": ("KV blocks held by at least one request", s.blocks_used),
            "kvengine_kv_blocks_cached": ("free KV blocks still holding a reusable prefix", s.blocks_cached_free),
            "kvengine_kv_blocks_shared": ("KV blocks held by more than one request", s.blocks_shared),
            "kvengine_kv_blocks_free": ("free KV blocks with nothing reusable", s.blocks_free),
            "kvengine_kv_cache_usage_ratio": ("used / total KV blocks", s.kv_usage),
            "kvengine_kv_bytes_per_token": ("KV cache bytes per token (all layers)", s.bytes_per_token),
            "kvengine_prefix_cache_hit_rate": ("prompt tokens served from the prefix cache / prompt tokens "
                                               "admitted, since start", s.prefix_hit_rate),
            "kvengine_requests_running": ("requests in the running batch", s.running),
            "kvengine_requests_waiting": ("requests waiting for a slot or for KV blocks", s.waiting),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        info = GaugeMetricFamily("kvengine_kv_cache_info", "KV cache format", labels=["dtype", "block_size"])
        info.add_metric([s.kv_dtype, str(s.block_size)], 1)
        yield info
        counters = {
            "kvengine_generation_tokens": ("tokens generated", s.tokens_generated),
            "kvengine_prefix_cache_hit_tokens": ("prompt tokens served from the prefix cache", s.prefix_hit_tokens),
            "kvengine_prefix_cache_query_tokens": ("prompt tokens admitted", s.prefix_query_tokens),
            "kvengine_prefix_cache_evictions": ("cached blocks evicted to make room", s.prefix_evictions),
            "kvengine_preemptions": ("sequences preempted (recomputed later) for lack of KV blocks", s.preemptions),
            "kvengine_engine_steps": ("engine steps", s.steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        if s.disk is not None:
            yield from _disk_metrics(s.disk)
        yield from _vllm_names(s, self.model_name)


def _vllm_names(s: EngineStats, model_name: str) -> Iterator[Metric]:
    """The engine figures again under the `vllm:` names that routers and dashboards built for vLLM scrape (vLLM
    production-stack's router reads the running / waiting requests, KV usage and prefix-cache hits; v1 renamed
    gpu_cache_usage_perc to kv_cache_usage_perc and dropped the gpu_ prefix of the prefix-cache counters, so both
    spellings are served). Labelled with model_name, as vLLM labels them."""
    gauges = {
        "vllm:num_requests_running": ("requests in the running batch", s.running),
        "vllm:num_requests_waiting": ("requests waiting for a slot or for KV blocks", s.waiting),
        "vllm:kv_cache_usage_perc": ("used / total KV blocks (1 = 100%)", s.kv_usage),
        "vllm:gpu_cache_usage_perc": ("used / total KV blocks (1 = 100%); vLLM v0's name", s.kv_usage),
        "vllm:gpu_prefix_cache_hit_rate": ("prompt tokens served from the prefix cache / prompt tokens admitted",
                                           s.prefix_hit_rate),
    }
    for name, (doc, value) in gauges.items():
        gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
        gauge.add_metric([model_name], value)
        yield gauge
    counters = {
        "vllm:prefix_cache_queries": ("prompt tokens admitted", s.prefix_query_tokens),
        "vllm:prefix_cache_hits": ("prompt tokens served from the prefix cache", s.prefix_hit_tokens),
        "vllm:gpu_prefix_cache_queries": ("prompt tokens admitted; vLLM v0's name", s.prefix_query_tokens),
        "vllm:gpu_prefix_cache_hits": ("prompt tokens served from the prefix cache; vLLM v0's name",
                                       s.prefix_hit_tokens),
        "vllm:num_preemptions": ("sequences preempted for lack of KV blocks", s.preemptions),
        "vllm:generation_tokens": ("tokens generated", s.tokens_generated),
    }
    for name, (doc, value) in counters.items():
        counter = CounterMetricFamily(name, doc, labels=["model_name"])
        counter.add_metric([model_name], value)
        yield counter


DISK_COUNTERS = {
    "tokens_loaded": "prompt tokens loaded from the KV disk tier instead of recomputed",
    "blocks_loaded": "KV blocks loaded from the disk tier",
    "bytes_loaded": "bytes of block files read for loaded blocks",
    "load_s": "seconds spent reading, verifying and copying loaded blocks",
    "lookups": "prompts looked up on disk after a memory miss",
    "store_reads": "block files found and read (disk hits)",
    "store_misses": "block files looked up and absent (disk misses)",
    "store_bytes_read": "bytes read from block files",
    "store_writes": "block files written",
    "store_bytes_written": "bytes written to block files",
    "store_evictions": "block files removed to keep the disk budget",
    "dropped": "blocks not written because the writer's queue was full",
}
DISK_GAUGES = {
    "store_files": "block files in the disk tier's directory",
    "store_bytes": "bytes of block files in the directory",
    "store_budget": "the disk tier's byte budget",
    "pending": "blocks queued for the disk writer",
}


def _disk_metrics(d: dict) -> Iterator[Metric]:
    """kvengine_kv_disk_*: the disk tier's counters, gauges, skipped (corrupt or foreign) files by reason and
    whether writes stopped."""
    for key, doc in DISK_COUNTERS.items():
        yield CounterMetricFamily(f"kvengine_kv_disk_{key}", doc, value=d[key])
    for key, doc in DISK_GAUGES.items():
        yield GaugeMetricFamily(f"kvengine_kv_disk_{key}", doc, value=d[key])
    skipped = CounterMetricFamily("kvengine_kv_disk_skipped_files", "block files refused and removed (truncated, "
                                  "checksum, version, fingerprint, salt, key)", labels=["reason"])
    for reason, n in sorted(d["store_skipped"].items()):
        skipped.add_metric([reason], n)
    yield skipped
    yield GaugeMetricFamily("kvengine_kv_disk_writes_stopped", "1 when the disk refused writes (full, read-only) "
                            "and the tier only reads", value=int(d["store_writes_stopped"] is not None))


class ServerMetrics:
    """Histograms and counters the server observes, plus the engine snapshot; one registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kvengine_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvengine_inter_token_latency_seconds", "time between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvengine_e2e_request_latency_seconds", "time from arrival to the last token",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.finished = Counter("kvengine_requests_finished", "finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("kvengine_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.rejected = Counter("kvengine_requests_rejected", "requests refused because the waiting queue was full",
                                registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)

    def observe_token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def observe_finished(self, finish_reason: str | None, prompt_tokens: int, seconds: float) -> None:
        self.finished.labels(finish_reason=finish_reason or "unknown").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e.observe(seconds)

    def name_model(self, model_name: str) -> None:
        """The model_name label of the vllm:-named families."""
        self._engine.model_name = model_name

    def render(self, stats: EngineStats) -> bytes:
        """The Prometheus text exposition, with engine gauges taken from `stats`."""
        self._engine.stats = stats
        return generate_latest(self.registry)
