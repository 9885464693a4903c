"""The server's Prometheus metrics: responses by status code, request latencies, and the engine's queue,
running set, KV blocks, prefix-cache hit rate and KV tiers (per tier: hits, misses, blocks resident, bytes
written and loaded, load bandwidth, load latency) read at scrape time.

Each app has its own `CollectorRegistry`, so several servers in one process (tests) do not clash. All
names start with `tokenforge_`.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tokenforge.engine.client import EngineClient
from tokenforge.engine.messages import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """`endpoints` are the routes' paths: other paths are counted as "other", so that clients probing
    random URLs cannot grow the label set."""

    def __init__(self, engine: EngineClient, endpoints: frozenset[str]):
        self.endpoints = endpoints
        self.registry = CollectorRegistry()
        self.responses = Counter("tokenforge_requests", "HTTP responses by endpoint and status code",
                                 ["endpoint", "status_code"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "tokenforge_time_to_first_token_seconds", "engine request received -> its first token at the server",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "tokenforge_inter_token_latency_seconds", "gap between consecutive tokens of one engine request",
            buckets=_TOKEN_GAP_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram(
            "tokenforge_e2e_request_latency_seconds", "engine request received -> finished (aborts excluded)",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def count(self, path: str, status_code: int) -> None:
        endpoint = path if path in self.endpoints else "other"
        self.responses.labels(endpoint, str(status_code)).inc()

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Times one engine request from the moment the server hands it over, as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.start)
        else:
            self.metrics.inter_token_latency.observe(now - self.last)
        self.last = now
        if out.finished:
            self.metrics.e2e_latency.observe(now - self.start)


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time (a snapshot; it may be one step behind)."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        queried, hits = stats["prefix_cache_queries"], stats["prefix_cache_hits"]
        yield GaugeMetricFamily("tokenforge_num_requests_waiting", "requests queued in the engine, not yet running",
                                value=stats["num_waiting"])
        yield GaugeMetricFamily("tokenforge_num_requests_running", "requests in the engine's running batch",
                                value=stats["num_running"])
        yield GaugeMetricFamily("tokenforge_kv_blocks_used", "KV cache blocks held by live requests",
                                value=stats["kv_blocks_used"])
        yield GaugeMetricFamily("tokenforge_kv_blocks_total", "KV cache blocks in the pool",
                                value=stats["kv_blocks_total"])
        yield GaugeMetricFamily("tokenforge_prefix_cache_hit_rate",
                                "share of looked-up prompt tokens found in the prefix cache (0 before any lookup)",
                                value=hits / queried if queried else 0.0)
        yield CounterMetricFamily("tokenforge_prefix_cache_queried_tokens", "prompt tokens looked up in the "
                                  "prefix cache", value=queried)
        yield CounterMetricFamily("tokenforge_prefix_cache_hit_tokens", "prompt tokens found in the prefix cache",
                                  value=hits)
        yield CounterMetricFamily("tokenforge_num_preemptions", "running requests preempted for lack of KV blocks",
                                  value=stats["num_preemptions"])
        if "kv_tier2_hits" in stats:
            yield from _tier_metrics(stats)
        if "structured_mask_seconds_p50" in stats:
            mask = GaugeMetricFamily("tokenforge_structured_mask_seconds", "grammar mask time per token (bitmask "
                                     "row), over the engine's recent masks", labels=["quantile"])
            mask.add_metric(["0.5"], stats["structured_mask_seconds_p50"])
            mask.add_metric(["0.99"], stats["structured_mask_seconds_p99"])
            yield mask
        if "spec_decode_num_drafts" in stats:  # vLLM's names, so its dashboards and clients read them
            for name, doc in (("spec_decode_num_drafts", "verification steps that carried a draft"),
                              ("spec_decode_num_draft_tokens", "draft tokens proposed and verified"),
                              ("spec_decode_num_accepted_tokens", "draft tokens the target accepted")):
                yield CounterMetricFamily(f"tokenforge_{name}", doc, value=stats[name])
        if "replicas" in stats:  # replicas on Ray: the figures above are their sums; here each one's
            yield from _replica_metrics(stats["replicas"], stats["cluster"])


_REPLICA_GAUGES = (("num_waiting", "requests queued in the replica"), ("num_running", "requests in its batch"),
                   ("kv_blocks_used", "KV blocks held by its live requests"), ("kv_blocks_total", "its KV pool"))
_CLUSTER_COUNTERS = (
    ("failovers", "replicas taken out of service after dying or hanging"),
    ("resumed_requests", "requests resumed on another replica after a failure"),
    ("pd_transfers", "prefill -> decode KV hand-offs"),
    ("pd_transfer_bytes", "bytes of KV shipped from prefill to decode replicas"),
    ("pd_transfer_seconds", "time spent exporting, shipping and importing KV (both sides)"),
    ("routed_prompt_blocks", "full prompt blocks of routed requests"),
    ("routed_prefix_blocks", "of which the router expected the chosen replica to hold"),
    ("scale_ups", "replicas the planner started"), ("scale_downs", "replicas the planner drained"))


def _replica_metrics(replicas: list[dict], cluster: dict):
    for name, doc in _REPLICA_GAUGES:
        family = GaugeMetricFamily(f"tokenforge_replica_{name}", doc, labels=["replica", "role"])
        for r in replicas:
            family.add_metric([str(r["replica"]), r["role"]], r.get(name, 0))
        yield family
    up = GaugeMetricFamily("tokenforge_replica_up", "1 while the replica serves, 0 while down or restarting",
                           labels=["replica", "role"])
    for r in replicas:
        up.add_metric([str(r["replica"]), r["role"]], 1 if r["state"] == "up" else 0)
    yield up
    for name, doc in _CLUSTER_COUNTERS:
        yield CounterMetricFamily(f"tokenforge_cluster_{name}", doc, value=cluster[name])


def _tier_metrics(stats: dict):
    """Per-tier series, labelled tier="1" (the pool), "2" (host memory), "3" (disk)."""
    def per_tier(kind, name: str, doc: str, key: str, tiers=("1", "2", "3")):
        family = kind(f"tokenforge_kv_tier_{name}", doc, labels=["tier"])
        for tier in tiers:
            family.add_metric([tier], stats[f"kv_tier{tier}_{key}"])
        return family

    yield per_tier(CounterMetricFamily, "hits", "prompt blocks found in this tier (looked up at admission)", "hits")
    yield per_tier(CounterMetricFamily, "misses", "prompt blocks looked up in this tier and not found", "misses")
    yield per_tier(GaugeMetricFamily, "blocks", "KV blocks resident in this tier (the pool: cached ones)", "blocks")
    yield per_tier(CounterMetricFamily, "bytes_written", "bytes written to this tier", "bytes_written", ("2", "3"))
    yield per_tier(CounterMetricFamily, "bytes_loaded", "bytes loaded from this tier into the pool",
                   "bytes_loaded", ("2", "3"))
    yield per_tier(CounterMetricFamily, "load_io_seconds", "seconds spent reading and copying loaded blocks",
                   "load_seconds", ("2", "3"))
    bandwidth = GaugeMetricFamily("tokenforge_kv_tier_load_bandwidth_bytes_per_second",
                                  "bytes loaded over seconds spent loading (0 before any load)", labels=["tier"])
    latency = HistogramMetricFamily("tokenforge_kv_tier_load_latency_seconds",
                                    "a request's KV load, queued to done, by the deepest tier it read", labels=["tier"])
    for tier in ("2", "3"):
        seconds = stats[f"kv_tier{tier}_load_seconds"]
        bandwidth.add_metric([tier], stats[f"kv_tier{tier}_bytes_loaded"] / seconds if seconds else 0.0)
        bounds, counts, total = stats[f"kv_tier{tier}_load_latency"]
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        latency.add_metric([tier], buckets, total)
    yield bandwidth
    yield latency


class ResponseCounter:
    """ASGI middleware: counts each HTTP response by endpoint and status code as its headers go out."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
