"""Prometheus metrics of the service, on their own registry (so several servers in one process never clash).

Owns the metric names: request latency per method (histogram), requests in flight per method, errors by
method and code, bytes moved per data plane and direction, entries pruned, and - read from the bank at scrape
time - the bank's streams, entries, payload bytes and LMDB file bytes. `serve_http(port)` exposes them at /metrics.

/metrics asks for no token (scrapers rarely carry one), so it names no tenant's stream: per-stream gauges
(`memflow_stream_entries`, `memflow_stream_payload_bytes`, labelled with the bank's stream name, tenant
included) appear only when the operator opts in (`stream_labels`, ServiceConfig.metrics_stream_labels).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _BankCollector:
    def __init__(self, stats: Callable[[], object], stream_labels: bool) -> None:
        self._stats = stats
        self._stream_labels = stream_labels

    def collect(self):
        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - a closing bank must not break a scrape
            return
        if self._stream_labels:
            entries = GaugeMetricFamily("memflow_stream_entries", "entries per stream", labels=["stream"])
            nbytes = GaugeMetricFamily("memflow_stream_payload_bytes", "payload bytes per stream", labels=["stream"])
            for s in stats.streams:
                entries.add_metric([s.name], s.entries)
                nbytes.add_metric([s.name], s.payload_bytes)
            yield entries
            yield nbytes
        for name, doc, value in (("memflow_streams", "streams in the bank", len(stats.streams)),
                                 ("memflow_entries", "entries in the bank, all streams", stats.entries),
                                 ("memflow_payload_bytes", "payload bytes in the bank, all streams",
                                  stats.payload_bytes)):
            total = GaugeMetricFamily(name, doc)
            total.add_metric([], value)
            yield total
        disk = GaugeMetricFamily("memflow_disk_bytes", "bytes of the LMDB files")
        disk.add_metric([], stats.disk_bytes)
        yield disk


class _TierCollector:
    """Cluster mode: where payload reads were served from (local cache, Mooncake, S3), bytes, recent p50/p99."""

    def __init__(self, stats: Callable[[], dict], promotions: Optional[Callable[[], Any]] = None) -> None:
        self._stats = stats
        self._promotions = promotions  # () -> cluster.promotion.PromotionStats

    def collect(self):
        try:
            stats = self._stats()
            promoted = self._promotions() if self._promotions is not None else None
        except Exception:  # noqa: BLE001 - a closing bank must not break a scrape
            return
        reads = CounterMetricFamily("memflow_tier_reads", "payload reads by the tier that served them", labels=["tier"])
        nbytes = CounterMetricFamily("memflow_tier_read_bytes", "payload bytes read by tier", labels=["tier"])
        load = GaugeMetricFamily("memflow_tier_load_ms", "load time of recent payload reads by tier",
                                 labels=["tier", "quantile"])
        for tier, s in stats.items():
            reads.add_metric([tier], s["reads"])
            nbytes.add_metric([tier], s["bytes"])
            load.add_metric([tier, "0.5"], s["p50_ms"])
            load.add_metric([tier, "0.99"], s["p99_ms"])
        yield from (reads, nbytes, load)
        if promoted is not None:
            outcomes = CounterMetricFamily("memflow_hot_promotions", "payload layers read from S3 and then promoted "
                                           "into the hot tier, dropped (queue full, closed, deleted) or failed",
                                           labels=["outcome"])
            for outcome in ("promoted", "dropped", "failed"):
                outcomes.add_metric([outcome], getattr(promoted, outcome))
            waiting = GaugeMetricFamily("memflow_hot_promotion_queue", "promotions waiting now", labels=["unit"])
            waiting.add_metric(["layers"], promoted.queued)
            waiting.add_metric(["bytes"], promoted.queued_bytes)
            yield from (outcomes, waiting)


class Metrics:
    def __init__(self, bank_stats: Optional[Callable[[], object]] = None, stream_labels: bool = False,
                 tier_stats: Optional[Callable[[], dict]] = None,
                 promotion_stats: Optional[Callable[[], Any]] = None) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("memflow_request_seconds", "request latency by method", ["method"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.errors = Counter("memflow_request_errors_total", "failed requests by method and status code",
                              ["method", "code"], registry=self.registry)
        self.in_flight = Gauge("memflow_requests_in_flight", "requests being handled now, by method", ["method"],
                               registry=self.registry)
        self.moved = Counter("memflow_data_plane_bytes_total", "K/V bytes moved by data plane and direction",
                             ["plane", "direction"], registry=self.registry)
        self.prunes = Counter("memflow_pruned_entries_total", "entries evicted by explicit Prune calls",
                              registry=self.registry)
        if bank_stats is not None:
            self.registry.register(_BankCollector(bank_stats, stream_labels))
        if tier_stats is not None:
            self.registry.register(_TierCollector(tier_stats, promotion_stats))
        self._http: Optional[Any] = None  # the /metrics server (serve_http): a wsgiref WSGIServer

    def bytes(self, plane: str, direction: str, n: int) -> None:
        self.moved.labels(plane, direction).inc(n)

    def pruned(self, n: int) -> None:
        self.prunes.inc(n)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics; returns the bound port (pass 0 for a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
