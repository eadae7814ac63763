"""Prometheus metrics of one server process (names documented in docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """All metrics in a private registry (several servers can live in one test process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge("im_connections", "Open WebSocket connections.", registry=r)
        self.draining = Gauge("im_draining", "1 while the node drains after SIGTERM.", registry=r)
        self.frames_in = Counter("im_frames_in_total", "Frames received.", ["type"], registry=r)
        self.frames_in_by_type: dict[str, Counter] = {}
        # Incremented on the hot path as a plain int, exported by a collector.
        self.frames_out = 0
        r.register(_FramesOut(self))
        self.messages = Counter(
            "im_messages_total", "Messages committed (new, not retries).", registry=r
        )
        self.errors = Counter("im_errors_total", "Errors by kind.", ["kind"], registry=r)
        self.send_ack = Histogram(
            "im_send_ack_seconds", "From a send frame read to its ack written.",
            buckets=_LATENCY, registry=r,
        )
        self.db = Histogram(
            "im_db_seconds", "PostgreSQL operation latency.", ["op"], buckets=_LATENCY, registry=r
        )
        self.redis = Histogram(
            "im_redis_seconds", "Redis operation latency.", ["op"], buckets=_LATENCY, registry=r
        )
        self.batch = Histogram(
            "im_commit_batch_size", "Sends per group-commit transaction.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r,
        )
        self.db_up = Gauge("im_db_up", "1 if the last PostgreSQL operation worked.", registry=r)
        self.redis_up = Gauge("im_redis_up", "1 while the Redis subscription is live.", registry=r)


class _FramesOut(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("im_frames_out", "Frames sent.", value=self.metrics.frames_out)
