"""The gateway's Prometheus metrics (``GET /metrics``), one registry per application."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

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
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens drawn from q*", registry=r)
        self.fallback_tokens = Counter(PREFIX + "fallback_tokens", "Tokens at positions that fell back", registry=r)
        self.alpha = Summary(PREFIX + "alpha", "α at each generated token", registry=r)
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
        self.generated_tokens.inc()
        self.alpha.observe(tok.alpha)
        if tok.fallback:
            self.fallback_tokens.inc()

    def observe_upstream(self, server: str, seconds: float, error: bool) -> None:
        """Record one call to `server`."""
        self.upstream_seconds.labels(server).observe(seconds)
        if error:
            self.upstream_errors.labels(server).inc()

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
