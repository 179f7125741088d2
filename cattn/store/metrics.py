"""Counters and latency histograms of a tier, and a Prometheus view of `TieredStore.stats()`.

`TierMetrics` is what a tier counts itself (the Redis tier: hits, misses by
reason, bytes, read/write latency). `StoreCollector` turns a store's
``stats()`` into Prometheus metric families at scrape time, so a scrape and
``stats()`` read the same counters; `serve_metrics` serves them over HTTP in
the Prometheus text format (names ``cattn_<tier>_<counter>``; see docs/store.md).
"""
from __future__ import annotations

import bisect
import threading
import time
from contextlib import contextmanager

# Latency bucket bounds in seconds: loopback Redis round trips (sub-ms) up to a timed-out call.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MISS_REASONS = ("absent", "corrupt", "foreign", "timeout", "server_error")
# stats() fields that are levels, not running totals (everything else numeric is a counter)
GAUGES = {"used_bytes", "capacity_bytes", "entries", "pinned", "read_bytes_per_s", "up"}


class Histogram:
    """Observations in fixed buckets; ``snapshot()`` is cumulative, as Prometheus wants."""

    def __init__(self, bounds=LATENCY_BUCKETS):
        self.bounds, self.counts, self.sum = tuple(bounds), [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        cum, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            cum += n
            buckets.append([bound, cum])
        return {"buckets": buckets, "count": cum, "sum": self.sum}


class TierMetrics:
    """Thread-safe counters of one tier: hits, misses by reason, bytes in/out, errors, read and write
    latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict(hits=0, misses=0, bytes_in=0, bytes_out=0, write_errors=0,
                             remove_errors=0)
        self.misses_by_reason = dict.fromkeys(MISS_REASONS, 0)
        self.latency = {"read": Histogram(), "write": Histogram()}

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self.counters[name] += n

    def miss(self, reason: str) -> None:
        with self._lock:
            self.counters["misses"] += 1
            self.misses_by_reason[reason] += 1

    @contextmanager
    def timed(self, op: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.latency[op].observe(time.perf_counter() - t0)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counters, misses_by_reason=dict(self.misses_by_reason),
                        **{f"{op}_latency_seconds": h.snapshot() for op, h in self.latency.items()})


class StoreCollector:
    """A prometheus_client collector over ``store.stats()``: one family per tier and field."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for tier, fields in self.store.stats().items():
            for name, value in fields.items():
                metric = f"cattn_{tier}_{name}"
                if isinstance(value, dict) and "buckets" in value:
                    yield HistogramMetricFamily(metric, f"{tier} {name.replace('_', ' ')}",
                                                buckets=[(_le(b), n) for b, n in value["buckets"]],
                                                sum_value=value["sum"])
                elif isinstance(value, dict):   # counts by label, e.g. misses_by_reason
                    fam = CounterMetricFamily(metric, f"{tier} {name.replace('_', ' ')}", labels=["reason"])
                    for label, n in value.items():
                        fam.add_metric([label], n)
                    yield fam
                elif isinstance(value, (bool, int, float)):
                    kind = GaugeMetricFamily if name in GAUGES else CounterMetricFamily
                    yield kind(metric, f"{tier} {name.replace('_', ' ')}", value=float(value))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def registry_for(store):
    """A fresh `CollectorRegistry` holding only ``store``'s metrics."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


def serve_metrics(store, port: int, addr: str = "127.0.0.1"):
    """Serve ``store``'s metrics at ``http://addr:port/metrics`` (Prometheus text format) from a daemon
    thread; ``port=0`` picks a free port. Returns the HTTP server (``server.server_port``; ``shutdown()``)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry_for(store))
    return server
