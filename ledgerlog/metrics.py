"""Prometheus metrics, and an optional HTTP endpoint for them.

All series carry the ledger's name; reader series also carry the reader's name, since a
process may run several replicas of one ledger (the demo does).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["serve"]

COMMITS = Counter(
    "ledgerlog_commits", "Transactions committed, as decided by a reader", ["ledger", "reader"]
)
ABORTS = Counter(
    "ledgerlog_aborts", "Transactions aborted, by reason", ["ledger", "reader", "reason"]
)
REJECTED_ENTRIES = Counter(
    "ledgerlog_rejected_entries",
    "Entries of a deposed writer or resends, rejected by a reader",
    ["ledger", "reader"],
)
MALFORMED_ENTRIES = Counter(
    "ledgerlog_malformed_entries", "Undecodable entries seen by a reader", ["ledger", "reader"]
)
APPLIED_SEQ = Gauge(
    "ledgerlog_reader_applied_seq", "Last seq a reader validated and applied", ["ledger", "reader"]
)
LAG = Gauge(
    "ledgerlog_reader_lag_seqs",
    "Seqs in the ledger the reader has not validated yet (computed at scrape time)",
    ["ledger", "reader"],
)


class _HistogramChild:
    """One label set's buckets; see :class:`BulkHistogram`."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Sequence[float]) -> None:
        find = bisect.bisect_left
        bounds = self._bounds
        with self._lock:
            counts = self.counts
            for v in values:
                counts[find(bounds, v)] += 1
            self.sum += sum(values)


class BulkHistogram(Collector):
    """A Prometheus histogram (same exposition as ``prometheus_client.Histogram``) whose
    hot path takes many observations in one lock round: a reader settles thousands of
    decisions per second, and one ``Histogram.observe`` each (two locked increments)
    was about 5% of a busy client's CPU."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._doc = documentation
        self._label = label
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self._children: dict[str, _HistogramChild] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def labels(self, value: str) -> _HistogramChild:
        with self._lock:
            child = self._children.get(value)
            if child is None:
                child = self._children[value] = _HistogramChild(self._bounds)
            return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=[self._label])
        with self._lock:
            children = sorted(self._children.items())
        for value, child in children:
            with child._lock:
                counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([value], buckets, total)
        yield family


COMMIT_LATENCY = BulkHistogram(
    "ledgerlog_commit_latency_seconds",
    "Client-side time from submit to the decision seen on the local replica",
    "ledger",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
WRITER_RECORDS = Counter("ledgerlog_writer_records", "Records appended", ["ledger"])
WRITER_TXNS = Counter("ledgerlog_writer_transactions", "Transactions appended", ["ledger"])
WRITER_NEXT_SEQ = Gauge("ledgerlog_writer_next_seq", "Seq the next appended txn takes", ["ledger"])
WRITER_EPOCH = Gauge("ledgerlog_writer_epoch", "Epoch of this process's elected writer", ["ledger"])
WRITER_FENCED = Counter(
    "ledgerlog_writer_fenced", "Times this process's writer lost its election", ["ledger"]
)

BK_GATEWAY_CALLS = Counter(
    "ledgerlog_bookkeeper_gateway_calls",
    "Calls from this process through the BookKeeper py4j gateway, by Java method",
    ["method"],
)
BK_GATEWAY_BYTES = Counter(
    "ledgerlog_bookkeeper_gateway_bytes",
    "Payload bytes through the BookKeeper py4j gateway (to_java, from_java)",
    ["direction"],
)
BK_GATEWAY_SECONDS = Counter(
    "ledgerlog_bookkeeper_gateway_call_seconds",
    "Time spent inside BookKeeper gateway calls, summed over threads",
)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Expose every metric at http://addr:port/metrics (loopback unless told otherwise)."""
    start_http_server(port, addr=addr, registry=REGISTRY)
