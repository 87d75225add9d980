"""Prometheus metrics of one app instance, on a registry of its own (so several apps in one process never clash).

Served at ``/metrics`` in the text exposition format. Names follow Prometheus conventions (seconds, ``_total``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Request latency, encode and search time, cache and rejection counters, index size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "clipsearch_request_seconds",
            "HTTP request latency",
            ("method", "route", "status"),
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.encode_seconds = Histogram(
            "clipsearch_encode_seconds", "time of one encoder call", ("kind",), buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.encode_batch_size = Histogram(
            "clipsearch_encode_batch_size", "inputs per encoder call", ("kind",), buckets=BATCH_BUCKETS, registry=r
        )
        self.search_seconds = Histogram(
            "clipsearch_search_seconds", "time of one FAISS search", ("index",), buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.search_batch_size = Histogram(
            "clipsearch_search_batch_size", "queries per FAISS image search call", buckets=BATCH_BUCKETS, registry=r
        )
        self.text_cache = Counter("clipsearch_text_cache", "text embedding cache lookups", ("result",), registry=r)
        self.rejected = Counter(
            "clipsearch_rejected", "requests refused to protect the server", ("reason",), registry=r
        )
        self.index_vectors = Gauge("clipsearch_index_vectors", "vectors in the served index", ("index",), registry=r)
        self.index_generation = Gauge(
            "clipsearch_index_generation", "number of the served generation (0: none)", registry=r
        )
        self.index_swaps = Counter("clipsearch_index_swaps", "published generations picked up", registry=r)

    def exposition(self) -> bytes:
        """The current values in Prometheus' text format."""
        return generate_latest(self.registry)
