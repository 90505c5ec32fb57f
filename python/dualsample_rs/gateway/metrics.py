"""The gateway's Prometheus metrics (``GET /metrics``), one registry per application."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from .sampler import TokenResult

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "dualsample_gateway_"


class GatewayMetrics:
    """Counters, gauges and histograms of one gateway. The α summary's ``_sum / _count``
    is the mean α of generated tokens; ``fallback_tokens_total / generated_tokens_total``
    is the fallback rate. A sampler records its upstream calls with
    :meth:`observe_upstream`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Requests answered, by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests sampled", registry=r)
        self.tokens = _TokenCounts()
        r.register(self.tokens)
        self.sequences_in_flight = Gauge(PREFIX + "sequences_in_flight", "Sequences being sampled", registry=r)
        self.requests_in_flight = Gauge(PREFIX + "requests_in_flight", "Requests being sampled", registry=r)
        self.queue_length = Gauge(PREFIX + "queue_length", "Requests waiting for a slot", registry=r)
        self.cancelled = Counter(PREFIX + "cancelled_sequences", "Sequences dropped (client gone)", registry=r)
        self.upstream_seconds = Histogram(PREFIX + "upstream_seconds", "Latency of calls to each server", ["server"],
                                          registry=r)  # fmt: skip
        self.upstream_errors = Counter(PREFIX + "upstream_errors", "Failed calls to each server", ["server"],
                                       registry=r)  # fmt: skip

    def observe_token(self, tok: TokenResult) -> None:
        """Count one generated token."""
        counts = self.tokens
        counts.generated += 1
        counts.alpha_sum += tok.alpha
        if tok.fallback:
            counts.fallback += 1

    def observe_upstream(self, server: str, seconds: float, error: bool) -> None:
        """Record one call to `server`."""
        self.upstream_seconds.labels(server).observe(seconds)
        if error:
            self.upstream_errors.labels(server).inc()

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class _TokenCounts(Collector):
    """The per-token series (generated and fallback tokens, the α summary), kept as plain
    numbers and read at scrape time: they move once per generated token, where the
    library's metric objects take a lock per update (three per token). The gateway's
    updates all come from its one event loop thread."""

    def __init__(self) -> None:
        self.generated = 0
        self.fallback = 0
        self.alpha_sum = 0.0
        self.created = time.time()

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(PREFIX + "generated_tokens", "Tokens drawn from q*", value=self.generated,
                                  created=self.created)  # fmt: skip
        yield CounterMetricFamily(PREFIX + "fallback_tokens", "Tokens at positions that fell back",
                                  value=self.fallback, created=self.created)  # fmt: skip
        yield SummaryMetricFamily(PREFIX + "alpha", "α at each generated token", count_value=self.generated,
                                  sum_value=self.alpha_sum)  # fmt: skip
